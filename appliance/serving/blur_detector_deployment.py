"""Ray Serve deployment of the blur detector: batches of tiles in, one BlurAssessment per tile out."""

from __future__ import annotations

import numpy as np
from ray import serve

from appliance.config import DetectorConfig
from appliance.detection.detector import BlurDetector
from appliance.messages import BlurAssessment
from appliance.spectral import SpectralReferenceArrays


@serve.deployment  # name = class name (Ray Serve convention)
class BlurDetectorDeployment:
    """Wraps one BlurDetector per replica (loaded once); concurrent calls are batched by Serve.

    Its verdicts are the model's own (uncalibrated): replicas are stateless, and the rig calibration and
    each beam's running baseline are applied by the ingest (appliance.detection.online_baseline), which
    sees every verdict in order. A calibrated microscope's ingest sends its rig's in-focus spectrum with
    each tile, so replicas shared by several microscopes read each tile against its own rig.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        self._detector = BlurDetector.from_config(cfg)
        self.assess_batch.set_max_batch_size(cfg.max_batch_size)
        self.assess_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def assess_batch(
        self, tiles: list[np.ndarray], references: list[SpectralReferenceArrays | None]
    ) -> list[BlurAssessment]:
        return self._detector.assess(tiles, spectral_references=references)

    async def __call__(
        self, tile: np.ndarray, spectral_reference: SpectralReferenceArrays | None = None
    ) -> BlurAssessment:
        """tile: (H, W) uint8/uint16, usually passed as an ObjectRef that Ray resolves zero-copy;
        spectral_reference: the tile's rig's in-focus spectrum (RigCalibration.spectral.arrays()) or None."""
        return await self.assess_batch(tile, spectral_reference)

    def model_version(self) -> str:
        return self._detector.model_version
