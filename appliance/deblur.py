"""Ray Serve deployment of the deblur model: batches of soft tiles in, restored tiles out."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve

from appliance.assessment import BlurAssessment
from appliance.config import DeblurConfig
from appliance.restoration import TileRestorer


@dataclass(frozen=True)
class RestoredTile:
    """A restored tile left in the object store: the caller hands `pixels_ref` on without copying it.

    replica: which replica restored it; busy_s: its share of that replica's batch time (s), so the
    shares summed per replica are the replica's compute time (utilisation in the metrics).
    """

    pixels_ref: ray.ObjectRef
    model_version: str
    replica: str = ""
    busy_s: float = 0.0


@serve.deployment(name="Deblur")
class DeblurDeployment:
    """Loads the restorer once per replica; concurrent calls are batched by Serve."""

    def __init__(self, cfg: DeblurConfig) -> None:
        self._restorer = TileRestorer.from_config(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self.restore_batch.set_max_batch_size(cfg.max_batch_size)
        self.restore_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def restore_batch(
        self, tiles: list[np.ndarray], assessments: list[BlurAssessment]
    ) -> list[RestoredTile]:
        t0 = time.perf_counter()
        restored = self._restorer.restore(tiles, assessments)
        share_s = (time.perf_counter() - t0) / len(tiles)
        version = self._restorer.model_version
        return [RestoredTile(ray.put(pixels), version, self._replica, share_s) for pixels in restored]

    async def __call__(self, tile: np.ndarray, assessment: BlurAssessment) -> RestoredTile:
        """tile: (H, W) uint8/uint16 (ObjectRef resolved by Ray); returns same shape and dtype."""
        return await self.restore_batch(tile, assessment)

    def model_version(self) -> str:
        return self._restorer.model_version
