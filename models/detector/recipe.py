"""The blur detector's training recipe, typed: models/detector/config.yaml, validated before training.

Unknown keys are refused naming the field; BlurNet is built from the typed `model:` section. A recipe
may be a parent plus overrides (`extends: corpus.yaml`, resolved as the deblur recipes do), and may
start from an exported detector (`init_from_onnx`, models/detector/warm_start.py) instead of random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.deblur.recipe import recipe_dict  # a RecipeError is a ValueError naming the file
from models.detector.network import BlurNet


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Range = list[float]  # [low, high]; a list, as in the YAML (the patch cache is keyed by these values)


class CorpusRenderConfig(_Strict):
    """`data.corpus:` renderings of real em-corpus tiles with their own noise (models/detector/corpus.py)."""

    share: float = Field(ge=0, le=1, description="Share of renderings from the corpus when ISBI is also trained on.")
    crop_px: int = Field(ge=64, description="Side of the random crop rendered (after any downscale).")
    p_scale: float = Field(ge=0, le=1, description="Share of renderings area-downscaled (another pixel size).")
    scale_range: Range = Field(min_length=2, max_length=2, description="Downscale factor.")
    contrast_range: Range = Field(min_length=2, max_length=2, description="Log-uniform contrast scale.")
    noise_gain_range: Range = Field(min_length=2, max_length=2, description="Log-uniform gain on the rig's noise.")


class PatchDataConfig(_Strict):
    """`data:` how training patches are rendered from the train split (models/detector/data.py)."""

    train_renderings: int = Field(ge=1, description="Blurred renderings of the training images (fixed pool).")
    val_images: int = Field(ge=1, description="Renderings of the val images (never the test images).")
    patches_per_image: int = Field(ge=1, description="Patches cut from each rendering.")
    sigma_range: Range = Field(min_length=2, max_length=2, description="px, log-uniform.")
    p_sharp: float = Field(ge=0, le=1, description="Share of renderings with no added blur.")
    p_blank: float = Field(ge=0, le=1, description="Share of renderings that are (nearly) blank resin.")
    contrast_range: Range = Field(min_length=2, max_length=2, description="Log-uniform contrast scale.")
    scale_range: Range = Field(min_length=2, max_length=2, description="Downscale before blur.")
    p_uint16: float = Field(ge=0, le=1)
    p_content: float = Field(0.0, ge=0, le=1, description="Share of renderings given non-blur content (fold...).")
    corpus: CorpusRenderConfig | None = Field(None, description="Real em-corpus renderings; None: ISBI only.")


class BlurNetConfig(_Strict):
    """`model:` the patch CNN (models/detector/network.py); BlurNet(**model_dump())."""

    widths: tuple[int, ...] = Field(min_length=2, description="Channels of the full-resolution and stride-2 stages.")


ValMetric = Literal["loss", "mean_abs_err_log_sigma", "median_abs_err_log_sigma"]  # train.evaluate's keys


class DetectorTrainConfig(_Strict):
    """`train:` epochs, AdamW + one-cycle schedule, loss weights, which val number picks the epoch."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    mse_weight: float = Field(ge=0, description="Plain MSE on log-sigma next to the Gaussian NLL.")
    aniso_weight: float = Field(ge=0, description="Log-anisotropy MSE, weighted by blur strength.")
    angle_weight: float = Field(ge=0, description="(cos 2θ, sin 2θ) MSE on astigmatic patches.")
    threads: int = Field(ge=1)
    select_by: ValMetric = Field(
        "loss",
        description="Val number whose lowest epoch is kept: the training loss (its variance-head NLL rewards a "
        "confident head), or the |log sigma| error the blur score is read from.",
    )


class DetectorRecipe(_Strict):
    """One training run of the blur detector."""

    seed: int
    out_dir: str = Field(description="Run folder (gitignored); export copies the ONNX into appliance/weights/.")
    data: PatchDataConfig
    model: BlurNetConfig
    train: DetectorTrainConfig
    init_from_onnx: str | None = Field(
        None, description="Exported detector (repo-relative .onnx) to fine-tune from; None: random init."
    )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the recipe, as recorded in the checkpoint and the sidecar (no init key when None)."""
        return self.model_dump(mode="json", exclude={"init_from_onnx"} if self.init_from_onnx is None else None)


def load_detector_recipe(path: Path) -> DetectorRecipe:
    """Read (`extends` resolved) and validate a detector recipe; ValueError naming the file and every bad field."""
    try:
        return DetectorRecipe.model_validate(recipe_dict(path))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path}: invalid recipe: {problems}") from exc


def build_blurnet(model: BlurNetConfig | dict[str, Any]) -> BlurNet:
    """BlurNet from the `model:` section (typed, or as recorded in a checkpoint)."""
    return BlurNet(**BlurNetConfig.model_validate(model).model_dump())
