"""Shared test fixtures: real Ray, real ZeroMQ on loopback, real files in tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "isbi2012-train"

# A local test cluster needs no token auth (Ray 2.60 enables it by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def real_em_tiles() -> list[tuple[str, np.ndarray]]:
    """The bundled sample tiles: real ISBI 2012 EM (sharp, soft and beyond repair), 512x512 uint8."""
    from appliance.tools.demo import sample_tiles

    return sample_tiles()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A real local Ray cluster (2 CPUs), one per test module so no two clusters overlap."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def start_appliance(ray_cluster: None, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Factory: start a real appliance (Serve deployments, actors, loopback sockets) from a RigConfig."""
    from appliance.serving.pipeline import Appliance

    started: list[Appliance] = []

    def _start(cfg: object) -> Appliance:
        appliance = Appliance(cfg)  # type: ignore[arg-type]
        appliance.start()
        started.append(appliance)
        return appliance

    yield _start
    for appliance in started:
        if appliance.endpoints is not None:
            appliance.drain_and_stop()
