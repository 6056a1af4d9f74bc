"""The restorer: TileRestorer and its backends (ONNX, torch/GPU, Wiener), tiling, intensity, PSF planes."""
