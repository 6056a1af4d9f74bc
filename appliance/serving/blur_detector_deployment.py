"""Ray Serve deployment of the blur detector: batches of tiles in, one BlurAssessment per tile out."""

from __future__ import annotations

import numpy as np
from ray import serve

from appliance.config import DetectorConfig
from appliance.detection.detector import BlurDetector
from appliance.messages import BlurAssessment


@serve.deployment  # name = class name (Ray Serve convention)
class BlurDetectorDeployment:
    """Wraps one BlurDetector per replica (loaded once); concurrent calls are batched by Serve.

    Its verdicts are the model's own (uncalibrated): replicas are stateless, and the rig calibration and
    each beam's running baseline are applied by the ingest (appliance.detection.online_baseline), which
    sees every verdict in order.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        self._detector = BlurDetector.from_config(cfg)
        self.assess_batch.set_max_batch_size(cfg.max_batch_size)
        self.assess_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def assess_batch(self, tiles: list[np.ndarray]) -> list[BlurAssessment]:
        return self._detector.assess(tiles)

    async def __call__(self, tile: np.ndarray, microscope: str = "") -> BlurAssessment:
        """tile: (H, W) uint8/uint16, usually passed as an ObjectRef that Ray resolves zero-copy.

        microscope: the name of the microscope the tile comes from (its calibration applies).
        """
        return await self.assess_batch(tile, microscope)

    def model_version(self) -> str:
        return self._detector.model_version
