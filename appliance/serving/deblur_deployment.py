"""Ray Serve deployment of the deblur model: batches of soft tiles in, restored tiles out."""

from __future__ import annotations

import logging
import time

import numpy as np
import ray
from ray import serve

from appliance.config import DeblurConfig
from appliance.messages import BlurAssessment, RestoredTile
from appliance.restoration.restorer import TileRestorer
from appliance.restoration.rig_wiener import RigRestoration

log = logging.getLogger(__name__)


@serve.deployment  # name = class name (Ray Serve convention)
class DeblurDeployment:
    """Wraps one TileRestorer per replica (loaded once); concurrent calls are batched by Serve."""

    def __init__(self, cfg: DeblurConfig) -> None:
        self._restorer = TileRestorer.from_config(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id
        if cfg.warmup_tile_shape is not None:  # before the replica reports ready: no tile waits for it
            try:
                seconds = self._restorer.warm_up(cfg.warmup_tile_shape)
            except Exception as exc:  # at start, loudly: not on a section's first soft tile
                raise RuntimeError(
                    f"deblur replica warm-up on a {list(cfg.warmup_tile_shape)} tile failed "
                    f"(backend {self._restorer.backend}, deblur.torch_compile: {cfg.torch_compile}): {exc}"
                ) from exc
            log.info(
                "deblur replica %s (%s) warmed up on a %s tile in %.1f s",
                self._replica,
                self._restorer.backend,
                "x".join(map(str, cfg.warmup_tile_shape)),
                seconds,
            )
        self.restore_batch.set_max_batch_size(cfg.max_batch_size)
        self.restore_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def restore_batch(
        self, tiles: list[np.ndarray], assessments: list[BlurAssessment], rigs: list[RigRestoration | None]
    ) -> list[RestoredTile]:
        t0 = time.perf_counter()
        restored, versions = self._restorer.restore_versioned(tiles, assessments, rigs=rigs)
        share_s = (time.perf_counter() - t0) / len(tiles)
        return [
            RestoredTile(ray.put(pixels), version, self._replica, share_s)
            for pixels, version in zip(restored, versions, strict=True)
        ]

    async def __call__(
        self, tile: np.ndarray, assessment: BlurAssessment, rig: RigRestoration | None = None
    ) -> RestoredTile:
        """tile: (H, W) uint8/uint16 (ObjectRef resolved by Ray); returns same shape and dtype. rig: the tile's
        rig calibration's restoration (replicas are shared by every microscope), None: the model alone."""
        return await self.restore_batch(tile, assessment, rig)

    def model_version(self) -> str:
        return self._restorer.model_version
