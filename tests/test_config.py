"""The rig config: rig.example.yaml against RigConfig()'s defaults, every shipped rig YAML, the GPU-share rule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ConfigError, MicroscopeConfig, RigConfig, gpu_shares_fit, load_rig_config

pytestmark = pytest.mark.fast

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "rig.example.yaml"
MULTISCOPE_EXAMPLE = REPO_ROOT / "rig.multiscope.example.yaml"
RIG_YAMLS = [EXAMPLE, MULTISCOPE_EXAMPLE, *sorted((REPO_ROOT / "bench").glob("rig-*.yaml"))]
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


def assert_refused(config: Path, text: str, match: str) -> None:
    """Writing `text` as the rig config at `config` makes loading it fail with a message matching `match`."""
    config.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_rig_config(config)


def test_replicas_beyond_the_gpus_are_refused_naming_the_fields(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    text = "deblur:\n  num_replicas: 3\n  num_gpus_per_replica: 0.75\nray:\n  num_gpus: 2\n"
    assert_refused(config, text, r"deblur.num_replicas x deblur.num_gpus_per_replica .*ray.num_gpus")
    assert_refused(
        config, "deblur:\n  num_gpus_per_replica: 1.5\n", r"deblur: .*num_gpus_per_replica \(1.5\) must be at most 1"
    )
    config.write_text(
        "detector:\n  num_replicas: 4\n  num_gpus_per_replica: 0.25\n"
        "deblur:\n  num_replicas: 2\n  num_gpus_per_replica: 0.5\nray:\n  num_gpus: 2\n"
    )
    assert load_rig_config(config).deblur.num_replicas == 2


def test_a_warm_up_shape_must_be_a_tile_and_torch_compile_a_known_mode(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    assert_refused(
        config,
        "deblur:\n  warmup_tile_shape: [2400, 8]\n",
        r"warmup_tile_shape \[2400, 8\]: each side must be 16-32768",
    )
    assert_refused(config, "deblur:\n  torch_compile: fast\n", r"torch_compile")
    config.write_text("deblur:\n  torch_compile: default\n  warmup_tile_shape: [2400, 2048]\n")
    deblur = load_rig_config(config).deblur
    assert (deblur.torch_compile, deblur.warmup_tile_shape) == ("default", (2400, 2048))


def test_every_yaml_in_the_repository_parses() -> None:
    tracked = [p for p in REPO_ROOT.rglob("*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts]
    assert tracked
    for path in tracked:
        if path.suffix in (".yaml", ".yml") and "templates" not in path.parts:
            yaml.safe_load(path.read_text(encoding="utf-8"))


def scope(name: str, port: int, folder: str, **extra: object) -> dict[str, object]:
    """One microscopes[] entry on loopback: tiles on `port`, feedback on `port` + 1."""
    endpoints = {"tile_endpoint": f"tcp://127.0.0.1:{port}", "feedback_endpoint": f"tcp://127.0.0.1:{port + 1}"}
    return {"name": name, **endpoints, "output_directory": folder, **extra}


def test_a_single_microscope_rig_is_served_as_one_microscope_named_after_the_rig() -> None:
    cfg = load_rig_config(EXAMPLE)
    (only,) = cfg.served_microscopes()
    assert (only.name, only.tile_endpoint, only.feedback_endpoint) == (
        "multisem-01",
        *[
            cfg.ingest.tile_endpoint,
            cfg.ingest.feedback_endpoint,
        ],
    )
    assert only.output_directory == cfg.output.directory
    assert only.controller_public_keys == cfg.security.controller_public_keys


def test_the_multiscope_example_gives_each_microscope_its_own_sockets_folder_key_and_calibration() -> None:
    cfg = load_rig_config(MULTISCOPE_EXAMPLE)
    scopes = cfg.served_microscopes()
    assert [m.name for m in scopes] == ["scope-a", "scope-b"]
    assert len({m.output_directory for m in scopes}) == 2
    assert len({m.detector_calibration for m in scopes}) == 2
    keys = [cfg.security_for(m).controller_public_keys for m in scopes]
    assert keys[0] != keys[1] and all(len(k) == 1 for k in keys)
    ingest = cfg.ingest_for(scopes[1])
    assert (ingest.tile_endpoint, ingest.max_in_flight) == ("tcp://0.0.0.0:5565", 16)
    assert cfg.output_for(scopes[1]).directory == Path("/data/em-appliance/out/scope-b")


def test_rig_keys_and_calibration_apply_to_a_microscope_without_its_own() -> None:
    key = "x" * 40
    cfg = RigConfig.model_validate(
        {
            "microscopes": [scope("a", 6000, "/o/a"), scope("b", 6002, "/o/b", detector_calibration="/c/b.json")],
            "detector": {"calibration": "/c/rig.json"},
            "security": {
                "curve": True,
                "server_secret_key_file": "/k/server.key_secret",
                "controller_public_keys": [key],
            },
        }
    )
    a, b = cfg.served_microscopes()
    assert (a.detector_calibration, b.detector_calibration) == (Path("/c/rig.json"), Path("/c/b.json"))
    assert a.controller_public_keys == b.controller_public_keys == [key]


@pytest.mark.parametrize(
    ("microscopes", "extra", "error"),
    [
        ([scope("a", 6000, "/o/a"), scope("a", 6002, "/o/b")], {}, r"a and a use the same name"),
        ([scope("a", 6000, "/o/a"), scope("b", 6001, "/o/b")], {}, r"a tcp://127.0.0.1:6001 and b .* same endpoint"),
        (
            [scope("a", 6000, "/o/a"), {**scope("b", 6002, "/o/b"), "tile_endpoint": "tcp://0.0.0.0:6000"}],
            {"security": {"allow_unauthenticated_network": True}},
            r"same endpoint \(tcp:6000\)",
        ),
        ([scope("a", 6000, "/o"), scope("b", 6002, "/o/b")], {}, r"'a' and 'b': output folders /o and /o/b overlap"),
        ([scope("a", 6000, "/o/a"), scope("b", 6002, "/o/a/")], {}, r"overlap"),
        (
            [scope("a", 6000, "/o/a")],
            {"ingest": {"tile_endpoint": "tcp://127.0.0.1:7000"}},
            r"ingest.tile_endpoint set",
        ),
        ([scope("a", 6000, "/o/a")], {"output": {"directory": "/o"}}, r"output.directory set together"),
        ([{**scope("a", 6000, "/o/a"), "feedback_endpoint": "tcp://0.0.0.0:6001"}], {}, r"microscopes\[0\].feedback"),
        (
            [scope("a", 6000, "/o/a")],
            {"security": {"curve": True, "server_secret_key_file": "/k"}},
            r"microscopes\[0\].controller_public_keys",
        ),
        ([{**scope("a", 6000, "/o/a"), "name": "a b"}], {}, r"microscopes.0.name"),
        ([{**scope("a", 6000, "/o/a"), "gpu": 1}], {}, r"microscopes.0.gpu"),
    ],
)
def test_bad_microscope_lists_are_refused_naming_the_field(
    tmp_path: Path, microscopes: list[dict[str, object]], extra: dict[str, object], error: str
) -> None:
    config = tmp_path / "rig.yaml"
    config.write_text(yaml.safe_dump({"microscopes": microscopes, **extra}))
    with pytest.raises(ConfigError, match=error):
        load_rig_config(config)


def test_wildcard_ports_never_collide() -> None:
    wild = {"tile_endpoint": "tcp://127.0.0.1:*", "feedback_endpoint": "tcp://127.0.0.1:*"}
    scopes = [MicroscopeConfig(name=n, output_directory=Path(f"/o/{n}"), **wild) for n in ("a", "b")]
    assert len(RigConfig(microscopes=scopes).served_microscopes()) == 2
