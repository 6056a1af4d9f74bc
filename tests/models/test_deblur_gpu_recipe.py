"""Deblur v3 (issue 13): PSF planes (numpy runtime == torch training), the blind path, the packed-data
training loop on --device cpu, and the multi-channel export (torch.export program == ONNX Runtime)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from appliance.messages import BlurAssessment
from appliance.restoration.psf_planes import (
    PLANE_NAMES,
    PsfEstimate,
    estimate_from_assessment,
    psf_planes,
    region_sigma_from_scores,
)
from appliance.restoration.psf_planes_torch import psf_planes_batch
from models.blur_synth import load_image, load_split
from models.deblur.export import export_run
from models.deblur.network import DeblurNet
from models.deblur.pack_data import PackedImage, load_packed, write_packed
from models.deblur.train import REPO_ROOT, train

TIER = "fast"  # this module's default tier (tests/conftest.py); tests of the other tier are marked


def torch_planes(height: int, width: int, estimate: PsfEstimate | None) -> np.ndarray:
    """The torch batch builder on one estimate, as training calls it."""
    if estimate is None:
        known, estimate = 0.0, PsfEstimate(1.7, 2.0, 30.0)  # anything: known = 0 must zero it
    else:
        known = 1.0
    region = estimate.region_sigma_px
    grid = np.full((1, 1), estimate.sigma_px, np.float32) if region is None else region
    planes = psf_planes_batch(
        height,
        width,
        torch.tensor([known]),
        torch.tensor([estimate.sigma_px]),
        torch.tensor([estimate.anisotropy]),
        torch.tensor([estimate.angle_deg]),
        torch.from_numpy(grid)[None],
    )
    return planes[0].numpy()


@pytest.mark.parametrize("shape", [(64, 96), (37, 50)])
def test_plane_builder_numpy_equals_torch(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    estimates = [
        PsfEstimate(2.1, 2.5, 135.0, rng.uniform(0.5, 3.0, (8, 8)).astype(np.float32)),
        PsfEstimate(1.2, 1.0, 0.0, rng.uniform(0.5, 3.0, (3, 5)).astype(np.float32)),
        PsfEstimate(0.9, 3.0, 10.0, None),
        None,
    ]
    for estimate in estimates:
        np.testing.assert_allclose(psf_planes(*shape, estimate), torch_planes(*shape, estimate), atol=2e-6)


def test_planes_encode_the_detector_estimate() -> None:
    scores = [[math.tanh(1.0 / 3.0)] * 4, [math.tanh(2.0 / 3.0)] * 4]  # top row 1 px, bottom row 2 px
    assessment = BlurAssessment(0.5, "soft", 2.0, anisotropy=math.e, angle_deg=45.0, region_scores=scores)
    planes = psf_planes(64, 32, estimate_from_assessment(assessment))
    assert planes.shape == (len(PLANE_NAMES), 64, 32)
    np.testing.assert_allclose(planes[0], 1.0)
    np.testing.assert_allclose(planes[1], 2.0 / 3.0, rtol=1e-6)
    sigma_local = planes[2] * 3.0
    assert sigma_local[0, 0] == pytest.approx(1.0, abs=1e-4)  # above the top cell centre: clamped
    assert sigma_local[-1, -1] == pytest.approx(2.0, abs=1e-4)
    assert np.all(np.diff(sigma_local[:, 0]) >= 0)  # interpolated between the rows, monotonic
    np.testing.assert_allclose(planes[3], 0.0, atol=1e-6)  # cos(90 deg) * log(e)
    np.testing.assert_allclose(planes[4], 1.0, rtol=1e-6)  # sin(90 deg) * log(e)
    assert region_sigma_from_scores([]) is None


def test_blind_path_is_all_zero_planes() -> None:
    assert estimate_from_assessment(None) is None
    assert estimate_from_assessment(BlurAssessment(1.0, "retake", float("nan"))) is None
    assert not psf_planes(16, 24, None).any()
    assert not torch_planes(16, 24, None).any()


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory: pytest.TempPathFactory):
    """A tiny packed file: two isbi crops (train), one 16-bit crop (train), one isbi crop (val)."""
    image = load_image(load_split("train")[0])
    val = load_image(load_split("val")[0])
    images = [
        PackedImage("a", "isbi2012", "train", image[:96, :96].copy()),
        PackedImage("b", "isbi2012", "train", image[100:196, 100:196].copy()),
        PackedImage("c", "sixteen", "train", (image[:96, 200:296].astype(np.uint16) * 200)),
        PackedImage("v", "isbi2012", "val", val[:96, :96].copy()),
    ]
    path = tmp_path_factory.mktemp("packed") / "tiny.npz"
    write_packed(images, path)
    return path


def test_packed_file_round_trips(packed_file) -> None:
    images = load_packed(packed_file)
    assert [(i.name, i.source, i.split, i.pixels.dtype) for i in images] == [
        ("a", "isbi2012", "train", np.uint8),
        ("b", "isbi2012", "train", np.uint8),
        ("c", "sixteen", "train", np.uint16),
        ("v", "isbi2012", "val", np.uint8),
    ]


@pytest.fixture(scope="module")
def cpu_run(packed_file, tmp_path_factory: pytest.TempPathFactory):
    """gpu.yaml shrunk to a width-8 model, trained 4 steps with --device cpu from the tiny packed file."""
    cfg = yaml.safe_load((REPO_ROOT / "models/deblur/gpu.yaml").read_text())
    cfg["model"].update(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])
    cfg["data"].update(patch=48, margin=16, batch=3, val_patches=3, val_patch=48)
    cfg["train"].update(steps=4, val_every=2, warmup_steps=1)
    folder = tmp_path_factory.mktemp("run")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return train(config, device="cpu", data_path=packed_file, out_dir=folder / "out", max_minutes=5.0)


@pytest.mark.system
def test_training_on_cpu_writes_checkpoints_and_curves(cpu_run) -> None:
    metrics = json.loads((cpu_run / "metrics.json").read_text())
    assert metrics["steps_done"] == 4 and not metrics["stopped_by_time_cap"]
    assert [r["step"] for r in metrics["history"]] == [2, 4]
    for key in ("minutes", "train_loss", "val_psnr", "val_blind_psnr", "val/isbi2012_psnr"):
        assert math.isfinite(metrics["history"][-1][key])
    assert metrics["parameters"] > 0 and metrics["gflop_per_2400_tile"] > 0
    assert (cpu_run / "config.yaml").is_file() and (cpu_run / "last.pt").is_file()
    best = torch.load(cpu_run / "best.pt", map_location="cpu", weights_only=False)
    assert set(best) >= {"model", "config", "step", "val_psnr"}
    assert (cpu_run / "best.pt").stat().st_size < 15_000_000


@pytest.mark.system
def test_time_cap_stops_cleanly(packed_file, cpu_run) -> None:
    config = cpu_run / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update(steps=10_000, val_every=10_000)
    config.write_text(yaml.safe_dump(cfg))
    run = train(config, device="cpu", data_path=packed_file, out_dir=cpu_run.parent / "capped", max_minutes=0.002)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped_by_time_cap"] and metrics["steps_done"] < 10_000
    assert len(metrics["history"]) == 1 and (run / "best.pt").is_file()


@pytest.mark.system
def test_export_program_agrees_with_onnx_for_the_psf_model(cpu_run, tmp_path) -> None:
    card = export_run(cpu_run, tmp_path, name="deblur_gpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deblur_gpu.json", "deblur_gpu.onnx", "deblur_gpu.pt2"]
    sidecar = json.loads((tmp_path / "deblur_gpu.json").read_text())
    assert sidecar["input_channels"] == 1 + len(PLANE_NAMES) == card.input_channels
    assert sidecar["psf_planes"] == list(PLANE_NAMES)
    rng = np.random.default_rng(1)
    pixels = rng.random((2, 1, 40, 56), dtype=np.float32)
    planes = np.stack([psf_planes(40, 56, PsfEstimate(2.0, 2.0, 60.0)), psf_planes(40, 56, None)])
    inputs = np.concatenate([pixels, planes], axis=1)
    session = ort.InferenceSession(str(tmp_path / "deblur_gpu.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["restored"], {"blurred": inputs})[0]
    program = torch.export.load(str(tmp_path / "deblur_gpu.pt2")).module()
    with torch.inference_mode():
        program_out = program(torch.from_numpy(inputs)).numpy()
    assert onnx_out.shape == (2, 1, 40, 56)
    np.testing.assert_allclose(program_out, onnx_out, atol=1e-4)


def test_psf_model_reads_the_planes() -> None:
    torch.manual_seed(0)
    model = DeblurNet(width=8, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), noise_map=True, psf_planes=True)
    for parameter in model.parameters():  # non-trivial weights (the residual scales start at zero)
        parameter.data.normal_(0.0, 0.1)
    pixels = torch.rand(1, 1, 32, 32)
    known = torch.from_numpy(psf_planes(32, 32, PsfEstimate(2.0)))[None]
    with torch.inference_mode():
        blind = model(torch.cat([pixels, torch.zeros_like(known)], dim=1))
        aware = model(torch.cat([pixels, known], dim=1))
    assert blind.shape == (1, 1, 32, 32) and not torch.equal(blind, aware)
