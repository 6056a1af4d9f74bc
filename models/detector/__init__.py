"""Learned blur detector: synthetic training data, patch CNN, training, ONNX export (see MODEL_CARD.md)."""
