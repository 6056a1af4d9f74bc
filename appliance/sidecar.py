"""The JSON sidecar beside each model file: one typed record, written by `models/` and read by the runtime.

`models/*/export.py` and the calibrate scripts write it; the runtime validates it on load, so a missing or
misspelt field fails at start-up naming the file and the field. It carries every constant the runtime
needs from training or calibration (nothing is pasted into the source by hand):

- blur detector (`blur_detector.json`, learned; `classical_detector.json`, the classical backend):
  patch size, the output encoding, the sigma calibration table, the PSF-shape constant `intrinsic_c2` and the
  local-blur window scale `local_window_scale`;
- deblur model (`deblur.json`, `deblur_gpu.json`): input/output names, size multiple, PSF planes.

Not to be confused with a MODEL_CARD.md (the human-readable card in `models/*/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SidecarError(RuntimeError):
    """A sidecar is missing, unreadable or incompatible; the message names the file and the fix."""


class _Strict(BaseModel):
    # Unknown keys are typos or a newer exporter: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class SigmaCalibration(_Strict):
    """Monotone table from a backend's raw blur sigma (px) to the true sigma (px), measured on the val split.

    beyond: how raw values past the table's end map: `scale` by the last true/estimated ratio (the learned
    model keeps reading larger blur), `clamp` to the last true value (the classical estimate stops rising).
    """

    estimated: list[float] = Field(min_length=2)
    true: list[float] = Field(min_length=2)
    beyond: Literal["scale", "clamp"] = "scale"

    @model_validator(mode="after")
    def _monotone(self) -> SigmaCalibration:
        if len(self.estimated) != len(self.true):
            raise ValueError(f"estimated ({len(self.estimated)}) and true ({len(self.true)}) differ in length")
        if any(b <= a for a, b in zip(self.estimated, self.estimated[1:], strict=False)):
            raise ValueError("estimated must be strictly increasing")
        return self

    def apply(self, sigma_px: np.ndarray) -> np.ndarray:
        """Map raw sigma (px, float array) through the table; float64 array of the same shape."""
        sigma_px = np.asarray(sigma_px, dtype=np.float64)
        estimated, true = np.array(self.estimated, float), np.array(self.true, float)
        mapped = np.interp(sigma_px, estimated, true)
        if self.beyond == "scale":
            beyond = sigma_px > estimated[-1]
            mapped[beyond] = sigma_px[beyond] * (true[-1] / estimated[-1])
        return mapped


class ModelSidecar(_Strict):
    """Fields every model's sidecar has; subclasses add what the runtime needs from each model."""

    model_version: str = Field(min_length=1)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read and validate `path` (the .json beside a model file); SidecarError naming the file and field."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.model_validate(raw)
        except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
            detail = _validation_problems(exc) if isinstance(exc, ValidationError) else str(exc)
            raise SidecarError(f"{path}: cannot read the model's sidecar ({detail}); {cls.rewrite_hint}") from exc

    @classmethod
    def for_model(cls, model_path: Path) -> Self:
        """The sidecar of a model file: the same name with .json."""
        return cls.load(Path(model_path).with_suffix(".json"))

    rewrite_hint: ClassVar[str] = "re-export the model to write it next to the model file"

    def write(self, path: Path) -> None:
        """Write atomically as indented JSON (None fields left out); a reader never sees half a file."""
        data = {k: v for k, v in self.model_dump(mode="json").items() if v is not None}
        partial = Path(path).with_name(f".{Path(path).name}.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, path)


def _validation_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors())


class DetectorSidecar(ModelSidecar):
    """Blur detector backend: patch contract, output encoding (learned model) and calibration constants."""

    rewrite_hint: ClassVar[str] = (
        "re-run `python -m models.detector.export` and `python -m models.detector.calibrate` "
        "(classical backend: `python -m models.detector.calibrate_classical`)"
    )

    patch: int = Field(ge=8, description="Side (px) of the square native-resolution patches the backend reads.")
    input: str | None = Field(None, description="Learned model: its input tensor, in words.")
    outputs: list[str] | None = Field(None, description="Learned model: names of the output columns, in order.")
    log_offset: float | None = Field(None, gt=0, description="Learned model: output 0 is log(sigma + log_offset).")
    epoch: int | None = None
    train_config: dict[str, Any] | None = Field(None, description="The training recipe (models/detector/config.yaml).")
    sigma_calibration: SigmaCalibration | None = Field(
        None, description="Raw sigma -> true sigma (px); None only while calibrate measures the raw backend."
    )
    local_window_scale: float | None = Field(
        None,
        gt=0,
        description="Tile-level sigma over the patch log-mean sigma (both +0.5 px) of uniformly blurred val tiles "
        "(median, true sigma 2-4 px): puts a local-blur window's patch mean on the label's scale "
        "(appliance/detection/local_blur.py); fitted by models/detector/calibrate.py (None: 1).",
    )
    intrinsic_c2: float | None = Field(
        None,
        gt=0,
        description="c^2 of the PSF-shape model (appliance/detection/psf_shape.py): the images' own blur plus "
        "the pre-smoothing, px^2; fitted on the val split by models/detector/calibrate.py (None until then).",
    )


class DeblurSidecar(ModelSidecar):
    """Deblur model: how to feed it (names, size multiple, PSF planes) and where it came from."""

    rewrite_hint: ClassVar[str] = "re-run `python -m models.deblur.export` to write it next to the .onnx file"

    size_multiple: int = Field(ge=1, description="H and W of a network input must be multiples of this.")
    input_name: str = "blurred"
    output_name: str = "restored"
    input_channels: int = Field(1, ge=1, description="1 = blind (pixels only); 1 + len(psf_planes) PSF-aware.")
    psf_planes: tuple[str, ...] = Field((), description="Plane names after the pixels, in channel order.")
    psf_plane_version: int | None = Field(None, description="appliance.restoration.psf_planes.PLANE_VERSION.")
    parameters: int | None = None
    gflop_per_2400_tile: float | None = None
    val_psnr_model_scale: float | None = None
    onnx_max_abs_diff_vs_torch: float | None = None
    onnx_sha256: str | None = None
    recipe: dict[str, Any] | None = Field(None, description="The training recipe (models/deblur/*.yaml).")
    torch: str | None = None

    @property
    def psf_aware(self) -> bool:
        """True when the model takes the PSF planes of `appliance.restoration.psf_planes` beside the pixels."""
        return bool(self.psf_planes)
