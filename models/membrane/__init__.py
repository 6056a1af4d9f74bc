"""Membrane segmenter for task-level checks of restoration: does a restored tile segment like an in-focus one?

Bench-only (never imported by `appliance/`): network, training data, training, scoring (`score.py`).
"""
