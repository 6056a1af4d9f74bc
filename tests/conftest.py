"""Shared test fixtures (real Ray, real ZeroMQ on loopback, real files in tmp_path) and the two test tiers.

Every test is in one tier, `fast` or `system`: a module-level `pytestmark`, or, in a module that holds
both, the module's `TIER = "fast"` (or "system") plus a mark on each test of the other tier:
- fast: pure functions, models and files; no Ray, no subprocess; the whole tier in under 30 s
  (`pytest -m fast`). A fast test that starts a process or a Ray cluster fails, naming the tier.
- system: real Ray and Serve, real ZeroMQ sockets, real processes (CLI, Ansible, Chromium), training
  and export runs (`pytest -m system`).
`pytest` runs both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "isbi2012-train"
TIERS = ("fast", "system")

# A local test cluster needs no token auth (Ray 2.60 enables it by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: a module's TIER must already be a mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its module's TIER unless marked; refuse a test in no tier or in both."""
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        default = getattr(getattr(item, "module", None), "TIER", None)
        if not tiers and default in TIERS:
            item.add_marker(default)
            tiers = {default}
        if len(tiers) != 1:
            raise pytest.UsageError(
                f"{item.nodeid}: in tiers {sorted(tiers) or 'none'}; mark it exactly one of "
                "pytest.mark.fast or pytest.mark.system (tests/conftest.py)"
            )


def _refuse(what: str) -> Callable[..., object]:
    def refuse(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError(f"a fast test may not {what}: mark it pytest.mark.system (tests/conftest.py)")

    return refuse


@pytest.fixture(autouse=True)
def _fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("fast") is None:
        return
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "init", _refuse("start Ray"))


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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (root and mount(8) needed; the test is skipped otherwise: never fill a real disk)."""
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a small filesystem needs root to mount a tmpfs; not filling a real disk instead")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield out
    subprocess.run(["umount", "-R", "-l", str(out)], check=False)
