"""The rig config: rig.example.yaml against RigConfig()'s defaults, every shipped rig YAML, the GPU-share rule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ConfigError, RigConfig, gpu_shares_fit, load_rig_config

pytestmark = pytest.mark.fast

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "rig.example.yaml"
RIG_YAMLS = [EXAMPLE, *sorted((REPO_ROOT / "bench").glob("rig-*.yaml"))]
MARK = "# rig-specific:"


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mapping -> {(section, key): value}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def line_of(text: str, path: tuple[str, ...]) -> str:
    """The line of the YAML `text` that sets the leaf `path` (its section header first)."""
    lines = text.splitlines()
    start = 0
    for depth, key in enumerate(path):
        pattern = re.compile(rf"^{'  ' * depth}{re.escape(key)}:")
        start = next(i for i in range(start, len(lines)) if pattern.match(lines[i]))
    return lines[start]


@pytest.mark.parametrize("path", RIG_YAMLS, ids=lambda p: p.name)
def test_every_shipped_rig_yaml_loads(path: Path) -> None:
    assert isinstance(load_rig_config(path), RigConfig)


def test_example_shows_the_defaults_except_marked_rig_choices() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    example = leaves(load_rig_config(EXAMPLE).model_dump(mode="json"))
    defaults = leaves(RigConfig().model_dump(mode="json"))
    written = leaves(yaml.safe_load(text))
    for path in written:
        marked = MARK in line_of(text, path)
        differs = example[path] != defaults[path]
        assert marked == differs, (
            f"rig.example.yaml {'.'.join(path)} = {example[path]!r}, default {defaults[path]!r}: "
            + ("mark it '# rig-specific: why'" if differs else "unmark it: it is the default")
        )


@pytest.mark.parametrize(
    ("shares", "gpus", "fits"),
    [
        ([0.5] * 4, 2, True),
        ([0.6] * 3, 2, False),  # 1.8 GPUs in total, but only one 0.6 share fits on a GPU
        ([0.5, 0.5, 0.25, 0.25, 0.25, 0.25], 2, True),
        ([1.0, 1.0], 1, False),
        ([2.0, 0.5], 3, True),
        ([0.0] * 8, 0, True),
    ],
)
def test_gpu_shares_fit_at_most_one_per_gpu(shares: list[float], gpus: int, fits: bool) -> None:
    assert gpu_shares_fit(shares, gpus) is fits


def test_replicas_beyond_the_gpus_are_refused_naming_the_fields(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    config.write_text("deblur:\n  num_replicas: 3\n  num_gpus_per_replica: 0.75\nray:\n  num_gpus: 2\n")
    with pytest.raises(ConfigError, match=r"deblur.num_replicas x deblur.num_gpus_per_replica .*ray.num_gpus"):
        load_rig_config(config)
    config.write_text("deblur:\n  num_gpus_per_replica: 1.5\n")
    with pytest.raises(ConfigError, match=r"deblur: .*num_gpus_per_replica \(1.5\) must be at most 1"):
        load_rig_config(config)
    config.write_text(
        "detector:\n  num_replicas: 4\n  num_gpus_per_replica: 0.25\n"
        "deblur:\n  num_replicas: 2\n  num_gpus_per_replica: 0.5\nray:\n  num_gpus: 2\n"
    )
    assert load_rig_config(config).deblur.num_replicas == 2


def test_every_yaml_in_the_repository_parses() -> None:
    tracked = [p for p in REPO_ROOT.rglob("*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts]
    assert tracked
    for path in tracked:
        if path.suffix in (".yaml", ".yml") and "templates" not in path.parts:
            yaml.safe_load(path.read_text(encoding="utf-8"))
