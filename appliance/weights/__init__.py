"""The bundled model files and their JSON sidecars (`appliance.sidecar`); one place names them.

Models are made in `models/` and exported here; the runtime only reads this folder.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
BLUR_DETECTOR_MODEL = WEIGHTS_DIR / "blur_detector.onnx"  # learned patch CNN (models/detector)
CLASSICAL_DETECTOR_SIDECAR = WEIGHTS_DIR / "classical_detector.json"  # calibration of the classical backend
DEBLUR_MODEL = WEIGHTS_DIR / "deblur.onnx"  # blind CPU deblur model: the default (models/deblur)
DEBLUR_GPU_MODEL = WEIGHTS_DIR / "deblur_gpu.onnx"  # PSF-aware GPU model, when exported (models/deblur/gpu.yaml)
