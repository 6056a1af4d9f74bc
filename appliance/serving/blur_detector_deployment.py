"""Ray Serve deployment of the blur detector: batches of tiles in, one BlurAssessment per tile out."""

from __future__ import annotations

import numpy as np
from ray import serve

from appliance.config import DetectorConfig
from appliance.detection.calibration import apply_to_all, load_configured_calibration
from appliance.detection.detector import BlurDetector
from appliance.messages import BlurAssessment


@serve.deployment  # name = class name (Ray Serve convention)
class BlurDetectorDeployment:
    """Wraps one BlurDetector per replica (loaded once); concurrent calls are batched by Serve.

    With detector.calibration set, every assessment is measured from the rig's in-focus baseline
    (appliance.detection.calibration); the file is loaded once here and checked against the model.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        self._cfg = cfg
        self._detector = BlurDetector.from_config(cfg)
        self._calibration = load_configured_calibration(cfg, self._detector.model_version)
        self.assess_batch.set_max_batch_size(cfg.max_batch_size)
        self.assess_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def assess_batch(self, tiles: list[np.ndarray]) -> list[BlurAssessment]:
        return apply_to_all(self._detector.assess(tiles), self._calibration, self._cfg)

    async def __call__(self, tile: np.ndarray) -> BlurAssessment:
        """tile: (H, W) uint8/uint16, usually passed as an ObjectRef that Ray resolves zero-copy."""
        return await self.assess_batch(tile)

    def model_version(self) -> str:
        return self._detector.model_version
