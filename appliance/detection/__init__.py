"""The blur detector: where it looks (patches), patch backends, PSF shape, the verdict, rig calibration."""
