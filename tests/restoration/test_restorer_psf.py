"""PSF-aware deblur runtime (issue 13 part B): sidecar fields, planes per tile from the assessment in the
tiled (ONNX) and whole-tile (torch, device-built planes) paths, the blind path, the bundled-weights choice.

No PSF-aware weights are bundled yet: a tiny untrained DeblurNet(psf_planes=True) with non-trivial random
weights is exported with models.deblur.export into tmp_path and served from there.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import appliance.restoration.restorer as restoration
from appliance.config import DeblurConfig
from appliance.messages import BlurAssessment
from appliance.restoration.intensity import from_model_scale, intensity_window, to_model_scale
from appliance.restoration.psf_planes import (
    PLANE_NAMES,
    PLANE_VERSION,
    PsfEstimate,
    estimate_from_assessment,
    psf_planes,
)
from appliance.restoration.psf_planes_torch import psf_planes_for_estimates
from appliance.restoration.restorer import TileRestorer, bundled_model, load_sidecar
from appliance.restoration.tiling import run_tiled
from appliance.restoration.torch_backend import TorchDeblur
from appliance.weights import DEBLUR_MODEL
from models.blur_synth import BlurParams, load_image, load_split, synthesize
from models.deblur.export import export_run
from models.deblur.network import DeblurNet

TIER = "system"  # this module's default tier (tests/conftest.py); tests of the other tier are marked

TINY = {
    "width": 8,
    "enc_blocks": [1, 1],
    "middle_blocks": 1,
    "dec_blocks": [1, 1],
    "noise_map": True,
    "psf_planes": True,
}
MARGIN = 32


@pytest.fixture(scope="module")
def psf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deblur_gpu.{onnx,pt2,json} of a tiny PSF-aware model, exported as a GPU run would be."""
    torch.manual_seed(0)
    model = DeblurNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()})
    for parameter in model.parameters():  # non-trivial weights: the residual scales start at zero
        parameter.data.normal_(0.0, 0.05)  # small enough that most outputs stay in range (no clipping)
    run = tmp_path_factory.mktemp("run")
    torch.save(
        {"model": model.state_dict(), "config": {"run_name": "tiny-psf", "model": TINY}, "step": 0, "val_psnr": 0.0},
        run / "best.pt",
    )
    out = tmp_path_factory.mktemp("weights")
    export_run(run, out, name="deblur_gpu")
    return out / "deblur_gpu.onnx"


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    return load_image(load_split("test")[1])  # 512 x 512 uint8


def blurred(sharp: np.ndarray, dtype: type[np.integer], seed: int, shape: tuple[int, int] = (203, 331)) -> np.ndarray:
    tile = synthesize(sharp[: shape[0], : shape[1]], BlurParams("gaussian", 2.0), np.random.default_rng(seed))
    if dtype == np.uint16:  # a narrow used range (1000-5000 DN), as 16-bit detectors deliver
        tile = (1000 + tile.astype(np.uint16) * 16).astype(np.uint16)
    tile.flags.writeable = False
    return tile


def detector_like(sigma: float = 2.0) -> BlurAssessment:
    """Astigmatic blur with an 8 x 8 region map rising from 1 px (top) to 3 px (bottom)."""
    rows = [[round(math.tanh((1.0 + 2.0 * r / 7) / 3.0), 4)] * 8 for r in range(8)]
    return BlurAssessment(0.6, "soft", sigma, anisotropy=1.8, angle_deg=120.0, region_scores=rows)


NO_ESTIMATE = BlurAssessment(1.0, "soft", float("nan"))


def onnx(model: Path, **geometry: int) -> TileRestorer:
    return TileRestorer.from_config(DeblurConfig(backend="onnx", model_path=model, **geometry))


def test_sidecar_records_the_planes(psf_model: Path) -> None:
    card = load_sidecar(psf_model)
    assert card.psf_aware and card.input_channels == 1 + len(PLANE_NAMES)
    assert card.psf_planes == PLANE_NAMES and card.psf_plane_version == PLANE_VERSION
    bundled = load_sidecar(DEBLUR_MODEL)  # the blind CPU model's sidecar has none of these fields
    assert not bundled.psf_aware and bundled.input_channels == 1 and bundled.psf_planes == ()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_psf_model_keeps_shape_and_dtype(psf_model: Path, sharp: np.ndarray, dtype: type[np.integer]) -> None:
    restorer = onnx(psf_model, patch_size=160)
    assert restorer.psf_aware and restorer.backend == "onnx-cpu"
    assert restorer.model_version == "deblur-tiny-psf-step0+onnx-cpu"
    tiles = [blurred(sharp, dtype, seed=1), blurred(sharp, dtype, seed=2, shape=(64, 97))]
    restored = restorer.restore(tiles, [detector_like(), NO_ESTIMATE])
    for tile, out in zip(tiles, restored, strict=True):
        assert out.shape == tile.shape and out.dtype == tile.dtype


def test_tiled_onnx_equals_whole_tile_torch(psf_model: Path, sharp: np.ndarray) -> None:
    card = load_sidecar(psf_model)
    tiles = [
        blurred(sharp, np.uint8, seed=3, shape=(256, 200)),
        blurred(sharp, np.uint16, seed=4, shape=(256, 200)),
        blurred(sharp, np.uint8, seed=5, shape=(256, 200)),
    ]
    assessments = [detector_like(), detector_like(1.3), NO_ESTIMATE]
    # 160 px patches: every tile is cut into several, so the planes are cut too.
    tiled = onnx(psf_model, patch_size=160, patch_overlap=MARGIN).restore(tiles, assessments)
    program = psf_model.with_suffix(".pt2")
    device = TorchDeblur(program, card.size_multiple, "cpu", torch.float32, psf_planes=True)
    # The whole-tile GPU path (planes built on the device), run here on the CPU in fp32, through the
    # restorer's batching (grouped by shape and dtype, the estimates travel with their tiles).
    cfg = DeblurConfig(backend="torch", model_path=psf_model, patch_overlap=MARGIN)
    whole_restorer = TileRestorer(
        device.run_patches, "whole", "torch-cpu-whole", cfg, card.size_multiple, device.restore_tiles, psf_aware=True
    )
    whole = whole_restorer.restore(tiles, assessments)
    via_torch = TileRestorer.from_config(cfg.model_copy(update={"patch_size": 160})).restore(tiles, assessments)
    for tile, reference, whole_out, torch_out in zip(tiles, tiled, whole, via_torch, strict=True):
        one_dn = 1 if tile.dtype == np.uint8 else 257 // 16  # the uint16 tiles use 1/16 of the range
        assert whole_out.dtype == torch_out.dtype == tile.dtype
        assert np.abs(reference.astype(np.int64) - torch_out).max() <= one_dn
        assert np.abs(reference.astype(np.int64) - whole_out).max() <= 2 * one_dn
    # ... and the planes matter: the same tile restored blind differs.
    (blind,) = whole_restorer.restore(tiles[:1], [NO_ESTIMATE])
    assert np.abs(blind.astype(np.int64) - whole[0]).max() > 2


def test_no_estimate_takes_the_blind_path(psf_model: Path, sharp: np.ndarray) -> None:
    tile = blurred(sharp, np.uint8, seed=6, shape=(160, 144))
    assert estimate_from_assessment(NO_ESTIMATE) is None
    restorer = onnx(psf_model, patch_size=160, patch_overlap=MARGIN)
    (restored,) = restorer.restore([tile], [NO_ESTIMATE])
    # By hand: the pixels on the model scale beside all-zero planes.
    card = load_sidecar(psf_model)
    session = restoration._onnx_runner(psf_model, card, [restoration.CPU], 1)
    window = intensity_window(tile)
    image = to_model_scale(tile, window)
    expected = run_tiled(image, session, 160, MARGIN, 4, card.size_multiple, planes=np.zeros((5, 160, 144), "f4"))
    np.testing.assert_array_equal(restored, from_model_scale(expected, window, tile.dtype))
    # The device path's default (no estimates given) is the blind path too.
    device = TorchDeblur(psf_model.with_suffix(".pt2"), card.size_multiple, "cpu", torch.float32, psf_planes=True)
    (default,) = device.restore_tiles([tile], MARGIN)
    (explicit,) = device.restore_tiles([tile], MARGIN, [None])
    np.testing.assert_array_equal(default, explicit)
    assert np.abs(default.astype(np.int64) - restored).max() <= 2


@pytest.mark.fast
def test_device_planes_equal_numpy_planes() -> None:
    rng = np.random.default_rng(0)
    estimates = [
        PsfEstimate(2.1, 2.5, 135.0, rng.uniform(0.5, 3.0, (8, 8)).astype(np.float32)),
        None,
        PsfEstimate(0.9, 3.0, 10.0, None),
        PsfEstimate(1.4, 1.2, 60.0, rng.uniform(0.5, 3.0, (8, 8)).astype(np.float32)),
    ]
    for batch in (estimates, estimates[:2], [None], [*estimates, PsfEstimate(1.0, 1.0, 0.0, np.ones((3, 5), "f4"))]):
        got = psf_planes_for_estimates(37, 50, batch, torch.device("cpu")).numpy()
        expected = np.stack([psf_planes(37, 50, e) for e in batch])
        np.testing.assert_allclose(got, expected, atol=2e-6)


def _edited_copy(psf_model: Path, folder: Path, **changes: object) -> Path:
    for suffix in (".onnx", ".json"):
        shutil.copy(psf_model.with_suffix(suffix), folder / f"edited{suffix}")
    sidecar = folder / "edited.json"
    raw = json.loads(sidecar.read_text())
    raw.update(changes)
    sidecar.write_text(json.dumps(raw))
    return folder / "edited.onnx"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"psf_planes": ["known", "sigma_local", "sigma_tile", "astig_cos", "astig_sin"]}, "trained on PSF planes"),
        ({"psf_plane_version": PLANE_VERSION + 1}, "version"),
        ({"psf_planes": "known"}, "cannot read"),
        ({"input_channels": 5}, "does not match 1 pixel channel"),
        ({"psf_planes": [], "input_channels": 6}, "no psf_planes listed"),
    ],
)
def test_incompatible_sidecar_is_refused_naming_the_file(
    psf_model: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    model = _edited_copy(psf_model, tmp_path, **changes)
    with pytest.raises(RuntimeError, match=message) as error:
        TileRestorer.from_config(DeblurConfig(backend="onnx", model_path=model))
    assert str(tmp_path / "edited.json") in str(error.value)


def test_bundled_weights_choice(psf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bundled_model("auto", cuda_visible=False) == DEBLUR_MODEL  # CPU rig: always the CPU model
    assert not restoration.DEBLUR_GPU_MODEL.exists()  # no GPU weights are bundled yet
    assert bundled_model("auto", cuda_visible=True) == DEBLUR_MODEL
    monkeypatch.setattr(restoration, "DEBLUR_GPU_MODEL", psf_model)
    assert bundled_model("auto", cuda_visible=True) == psf_model
    assert bundled_model("auto", cuda_visible=False) == DEBLUR_MODEL
    assert bundled_model("onnx", cuda_visible=True) == bundled_model("torch", cuda_visible=True) == DEBLUR_MODEL
    onnx_only = tmp_path / "deblur_gpu.onnx"
    shutil.copy(psf_model, onnx_only)
    monkeypatch.setattr(restoration, "DEBLUR_GPU_MODEL", onnx_only)  # no sidecar: not a usable export
    assert bundled_model("auto", cuda_visible=True) == DEBLUR_MODEL


def test_auto_on_a_gpu_machine_prefers_the_gpu_model_and_falls_back(
    psf_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restoration, "DEBLUR_GPU_MODEL", psf_model)
    monkeypatch.setattr(restoration, "_cuda_visible", lambda: True)
    # This box has no GPU backend: the GPU model is not served on the CPU, the blind CPU model is.
    fallback = TileRestorer.from_config(DeblurConfig())
    assert fallback.backend == "onnx-cpu" and not fallback.psf_aware
    assert fallback.model_version.startswith(load_sidecar(DEBLUR_MODEL).model_version)
    # With a GPU backend that agrees with ONNX Runtime CPU (stood in for by the torch program on the
    # CPU), auto serves the GPU model.
    monkeypatch.setattr(
        restoration,
        "_gpu_candidates",
        lambda path, card, threads: [lambda: restoration._torch_engine(path, card, None)],
    )
    chosen = TileRestorer.from_config(DeblurConfig())
    assert chosen.psf_aware and chosen.model_version == "deblur-tiny-psf-step0+torch-cpu"
