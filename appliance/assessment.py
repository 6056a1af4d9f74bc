"""What the blur detector says about one tile; shared by the detector, deblur, sink and CLI (no I/O)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TileLabel = Literal["sharp", "soft", "retake"]
TILE_LABELS: tuple[TileLabel, ...] = ("sharp", "soft", "retake")


@dataclass(frozen=True)
class BlurAssessment:
    """Focus verdict for one tile.

    blur_score: 0 = sharp ... 1 = very blurred.
    label: `sharp` (write as is) | `soft` (restore with the deblur model) | `retake` (beyond repair or
        not judgeable; flagged to the controller).
    sigma_px: estimated blur as the Gaussian-equivalent PSF sigma in pixels (major axis).
    anisotropy: sigma_major / sigma_minor (1.0 = isotropic defocus, > 1 = astigmatism).
    angle_deg: orientation of the major axis, degrees in [0, 180).
    region_scores: coarse grid (rows of floats, e.g. 8x8) of blur_score per region, to catch partial blur.
    reason: why the label is `retake` ("" otherwise), in words an operator understands.
    model_version: which detector produced this (recorded in the QC record).
    """

    blur_score: float
    label: TileLabel
    sigma_px: float
    anisotropy: float = 1.0
    angle_deg: float = 0.0
    region_scores: list[list[float]] = field(default_factory=list)
    reason: str = ""
    model_version: str = ""

    def to_record(self) -> dict[str, Any]:
        """Plain dict for JSON/msgpack (QC record, CLI output)."""
        return asdict(self)
