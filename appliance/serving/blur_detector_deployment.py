"""Ray Serve deployment of the blur detector: batches of tiles in, one BlurAssessment per tile out."""

from __future__ import annotations

from pathlib import Path

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
    Several microscopes share the deployment: `calibrations` names each one's file (None: detector.calibration),
    and a call says which microscope its tile comes from.
    """

    def __init__(self, cfg: DetectorConfig, calibrations: dict[str, Path | None] | None = None) -> None:
        self._cfg = cfg
        self._detector = BlurDetector.from_config(cfg)
        self._calibration = load_configured_calibration(cfg, self._detector.model_version)
        version = self._detector.model_version
        self._by_microscope = {
            name: load_configured_calibration(cfg.model_copy(update={"calibration": path}), version)
            for name, path in (calibrations or {}).items()
            if path is not None
        }
        self.assess_batch.set_max_batch_size(cfg.max_batch_size)
        self.assess_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def assess_batch(self, tiles: list[np.ndarray], microscopes: list[str]) -> list[BlurAssessment]:
        assessments = self._detector.assess(tiles)
        return [
            apply_to_all([a], self._by_microscope.get(m, self._calibration), self._cfg)[0]
            for a, m in zip(assessments, microscopes, strict=True)
        ]

    async def __call__(self, tile: np.ndarray, microscope: str = "") -> BlurAssessment:
        """tile: (H, W) uint8/uint16, usually passed as an ObjectRef that Ray resolves zero-copy.

        microscope: the name of the microscope the tile comes from (its calibration applies).
        """
        return await self.assess_batch(tile, microscope)

    def model_version(self) -> str:
        return self._detector.model_version
