"""Commands around the runtime (never imported by it): CLI, demo, offline score/deblur, reference controller."""
