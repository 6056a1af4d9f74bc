"""The deblur training recipe, typed: what every models/deblur/*.yaml holds, validated before training.

Unknown keys are refused naming the field (a typo in a recipe would otherwise be silently ignored), and
the network is built from the typed `model:` section (`build_model`). A stage is a parent plus
overrides: `extends: stage2.yaml` (a path relative to the file) takes the parent's recipe and replaces
the keys this file gives, section by section, so a stage writes only what changed. `init_from` is another
relation: the checkpoint a fine-tuning stage starts from. gpu.yaml's `cpu_overrides` apply the same way
when it runs with `--device cpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.blur_synth import BlurFamily
from models.deblur.network import DeblurNet


class RecipeError(ValueError):
    """A recipe cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """`model:` the DeblurNet architecture (models/deblur/network.py); DeblurNet(**model_dump())."""

    width: int = Field(ge=1, description="Channels at full resolution, doubled at each encoder level.")
    enc_blocks: tuple[int, ...] = Field(min_length=1, description="NAFBlocks per encoder level.")
    middle_blocks: int = Field(ge=0)
    dec_blocks: tuple[int, ...] = Field(min_length=1, description="NAFBlocks per decoder level.")
    noise_map: bool = Field(False, description="Add the local noise-level input channel (NoiseLevelMap).")
    psf_planes: bool = Field(False, description="Take the PSF planes of appliance.restoration.psf_planes.")

    @model_validator(mode="after")
    def _levels_match(self) -> ModelConfig:
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ValueError(f"enc_blocks {self.enc_blocks} and dec_blocks {self.dec_blocks} need the same length")
        return self


class DataConfig(_Strict):
    """`data:` training pairs: where sharp images come from, how they are degraded, the validation set."""

    source: Literal["isbi", "packed"] = Field(
        "isbi", description="isbi: numpy pairs from ../shared/data; packed: one .npz, degraded on the device."
    )
    packed: str | None = Field(None, description="The packed .npz (source packed; --data overrides).")
    patch: int = Field(ge=8, description="Training patch side (px).")
    margin: int = Field(ge=0, description="Context blurred around each patch, then cut off (px).")
    batch: int = Field(ge=1)
    sigma_range: tuple[float, float] = Field(description="Log-uniform Gaussian-equivalent sigma (px).")
    families: tuple[BlurFamily, ...] = Field(min_length=1)
    sharp_fraction: float = Field(ge=0, le=1, description="Noise-only examples: sharp structure left alone.")
    uint16_fraction: float = Field(ge=0, le=1, description="Quantise to uint16 instead of uint8.")
    noise_free_fraction: float = Field(0.0, ge=0, le=1, description="Quantisation-only examples.")
    blind_fraction: float = Field(0.2, ge=0, le=1, description="PSF-aware: planes all zero (no estimate).")
    wrong_estimate_fraction: float = Field(0.05, ge=0, le=1, description="PSF-aware: a random sigma.")
    estimate_bias_px: tuple[float, float] = Field((0.0, 0.8), description="PSF-aware: detector's sigma bias.")
    estimate_gain_log_sd: float = Field(0.12, ge=0, description="PSF-aware: detector's sigma gain spread.")
    photons_range: tuple[float, float] | None = Field(
        None, description="Packed: Poisson photons per unit, log-uniform; None = models.blur_synth.PHOTONS_RANGE."
    )
    own_noise_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Packed: share of noisy samples whose noise is Gaussian at the crop's own (Immerkaer) "
        "level x 0.7-1.4 instead of Poisson-Gaussian: the rig's noise on top of a real tile's own.",
    )
    exclude_sources: tuple[str, ...] = Field(
        (), description="Packed: sources left out of training and validation (a leave-one-source-out fold)."
    )
    val_patches: int = Field(ge=1, description="Fixed validation set from the val split (never test).")
    val_patch: int = Field(ge=8)
    val_seed: int | None = Field(None, description="Validation draw; None = seed + 1.")
    val_chunk: int | None = Field(None, ge=1, description="Validation patches per call; None = batch.")

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        if not 0.0 < self.sigma_range[0] <= self.sigma_range[1]:
            raise ValueError(f"sigma_range {self.sigma_range} must satisfy 0 < low <= high")
        if self.photons_range is not None and not 0.0 < self.photons_range[0] <= self.photons_range[1]:
            raise ValueError(f"photons_range {self.photons_range} must satisfy 0 < low <= high")
        packed_only = {
            "photons_range": self.photons_range is not None,
            "own_noise_fraction": self.own_noise_fraction > 0,
            "exclude_sources": bool(self.exclude_sources),
        }
        ignored = [name for name, given in packed_only.items() if given]
        if self.source != "packed" and ignored:
            raise ValueError(f"{', '.join(ignored)}: only source: packed reads them (this recipe has {self.source})")
        return self


class TrainConfig(_Strict):
    """`train:` optimisation: steps, wall-clock cap, loss and the AdamW + cosine schedule."""

    steps: int = Field(ge=1)
    max_minutes: float = Field(gt=0, description="Hard wall-clock cap; the run stops early, logged, if hit.")
    schedule: Literal["steps", "time"] = Field("steps", description="time: cosine over the minutes as well.")
    loss: Literal["l1", "psnr"] = "l1"
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_steps: int = Field(ge=1)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    grad_clip: float = Field(gt=0)
    val_every: int = Field(ge=1)


class InitFrom(_Strict):
    """`init_from:` a fine-tuning stage starts from its parent run's checkpoint (trained first if missing),
    from the weights of an exported program (`program:`, e.g. the bundled appliance/weights/deblur.pt2) or
    from a run's checkpoint file (`file:`, e.g. a fold's best.pt brought back from a GPU machine)."""

    config: str | None = Field(None, description="The parent recipe, relative to the repository root.")
    checkpoint: Literal["best.pt", "last.pt"] = "best.pt"
    program: str | None = Field(None, description="A torch.export .pt2, relative to the repository root.")
    file: str | None = Field(None, description="A run's best.pt / last.pt, relative to the repository root.")

    @model_validator(mode="after")
    def _one_parent(self) -> InitFrom:
        if sum(x is not None for x in (self.config, self.program, self.file)) != 1:
            raise ValueError(
                "give exactly one of config (a parent recipe), program (an exported .pt2) and file (a checkpoint)"
            )
        return self


class DeblurRecipe(_Strict):
    """One training run of the deblur model (one YAML file, its `extends` chain resolved)."""

    run_name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    seed: int
    threads: int = Field(ge=1, description="torch.set_num_threads (CPU); unused on CUDA.")
    device: Literal["cpu", "cuda"] = "cpu"
    init_from: InitFrom | None = None
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    cpu_overrides: dict[str, Any] | None = Field(
        None, description="Keys replaced on --device cpu (e.g. a smaller batch); checked like the rest."
    )

    @model_validator(mode="after")
    def _overrides_valid(self) -> DeblurRecipe:
        if self.cpu_overrides:
            DeblurRecipe.model_validate(merge(self.model_dump(exclude={"cpu_overrides"}), self.cpu_overrides))
        return self

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of every effective value (YAML/JSON-safe): recorded with the run and the export."""
        return self.model_dump(mode="json", exclude_none=True)


def merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`base` with the keys of `overrides` replaced; nested sections are merged key by key."""
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_dict(path: Path) -> dict[str, Any]:
    """The YAML at `path` with its `extends` chain resolved (parent first), as a plain dict."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    return merge(recipe_dict(path.parent / parent), raw) if parent else raw


def validate_recipe(raw: dict[str, Any], source: Path | str) -> DeblurRecipe:
    """DeblurRecipe from a resolved dict; RecipeError naming `source` and every bad field."""
    try:
        return DeblurRecipe.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"{source}: invalid recipe: {problems}") from exc


def load_recipe(path: Path) -> DeblurRecipe:
    """The typed recipe of one YAML file (extends resolved, cpu_overrides kept, not applied)."""
    return validate_recipe(recipe_dict(path), path)


def effective_recipe(
    path: Path,
    data_path: Path | None = None,
    max_minutes: float | None = None,
    device: str | None = None,
    exclude_sources: tuple[str, ...] = (),
    run_name: str | None = None,
    init_checkpoint: Path | None = None,
) -> DeblurRecipe:
    """The recipe with the command line's overrides applied: device (cpu_overrides on cpu), data, cap,
    sources left out (added to the recipe's), the run's name and the checkpoint it starts from."""
    raw = recipe_dict(path)
    if init_checkpoint is not None:
        raw["init_from"] = {"file": str(init_checkpoint)}
    if exclude_sources:
        listed = tuple(raw.get("data", {}).get("exclude_sources", ()))
        raw = merge(raw, {"data": {"exclude_sources": [*listed, *exclude_sources]}})
    if run_name is not None:
        raw["run_name"] = run_name
    raw["device"] = device or raw.get("device", "cpu")
    overrides = raw.pop("cpu_overrides", None)
    if raw["device"] == "cpu":
        raw = merge(raw, overrides)
    if data_path is not None:
        raw = merge(raw, {"data": {"packed": str(data_path)}})
    if max_minutes is not None:
        raw = merge(raw, {"train": {"max_minutes": float(max_minutes)}})
    return validate_recipe(raw, path)


def build_model(model: ModelConfig | dict[str, Any]) -> DeblurNet:
    """DeblurNet from the `model:` section (typed, or as recorded in a checkpoint or sidecar)."""
    return DeblurNet(**ModelConfig.model_validate(model).model_dump())
