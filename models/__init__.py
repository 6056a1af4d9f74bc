"""Training, evaluation and export of the appliance's models (not installed; run from the repo root)."""
