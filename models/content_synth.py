"""Non-blur content for sharp and blurred training tiles: what fools focus metrics but is not blur.

Issue 14 point 3: folds, cracks, dirt particles, section edges, knife chatter, low contrast, inverted
contrast, charging gradients and stitching seams must never turn a sharp tile into `soft`/`retake`.
Each kind is a function of a float image in [0, 1] (H, W) and explicit geometry, so the detector's
training (`random_content`, random geometry) and `bench/detector_content.py` (fixed geometry) share one
rendering. Content is drawn into the specimen *before* blur and noise: a fold in a defocused tile is
as blurred as the tissue around it, so the label stays the tile's blur.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Content = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _line_distance(shape: tuple[int, int], angle_deg: float, offset: float) -> np.ndarray:
    """Signed distance (px) of every pixel to a line through the centre shifted by `offset` px.

    angle_deg is the direction of the line's normal, from +x towards +y.
    """
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    a = math.radians(angle_deg)
    return (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a) - offset


def fold(f: np.ndarray, angle_deg: float, offset: float, half_width: float, darkness: float = 0.35) -> np.ndarray:
    """A section fold: a band where two layers overlap, darker, both in focus."""
    out = f.copy()
    out[np.abs(_line_distance(f.shape, angle_deg, offset)) < half_width] *= darkness
    return out


def crack(f: np.ndarray, angle_deg: float, offset: float, half_width: float, level: float = 0.95) -> np.ndarray:
    """A crack: bare support film, a bright band with sharp edges."""
    out = f.copy()
    out[np.abs(_line_distance(f.shape, angle_deg, offset)) < half_width] = level
    return out


def dirt(f: np.ndarray, cy: float, cx: float, radius: float, level: float = 0.03) -> np.ndarray:
    """A dirt particle: a dark disk."""
    h, w = f.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    out = f.copy()
    out[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = level
    return out


def section_edge(f: np.ndarray, angle_deg: float, offset: float) -> np.ndarray:
    """The section's edge: beyond a line, flat resin at the tissue's median grey."""
    out = f.copy()
    out[_line_distance(f.shape, angle_deg, offset) > 0] = float(np.median(f))
    return out


def chatter(f: np.ndarray, period: float, amplitude: float, angle_deg: float = 90.0) -> np.ndarray:
    """Knife chatter: periodic thickness bands, i.e. a periodic brightness modulation."""
    phase = _line_distance(f.shape, angle_deg, 0.0)
    return np.clip(f * (1.0 + amplitude * np.sin(2.0 * np.pi * phase / period)), 0.0, 1.0)


def low_contrast(f: np.ndarray, factor: float, level: float = 0.45) -> np.ndarray:
    """Faint content: contrast scaled by `factor` around `level`."""
    return np.clip(level + factor * (f - f.mean()), 0.0, 1.0)


def inverted(f: np.ndarray) -> np.ndarray:
    """Inverted contrast (e.g. a backscatter detector or an inverted TEM print)."""
    return 1.0 - f


def charging(f: np.ndarray, angle_deg: float, low: float = 0.5, high: float = 1.3) -> np.ndarray:
    """Charging: a smooth brightness gain ramp across the tile."""
    d = _line_distance(f.shape, angle_deg, 0.0)
    span = float(np.ptp(d)) or 1.0
    gain = low + (high - low) * (d - d.min()) / span
    return np.clip(f * gain, 0.0, 1.0)


def seam(f: np.ndarray, vertical: bool, position: float, gain: float = 1.3, shift: float = 0.05) -> np.ndarray:
    """A stitching seam: a brightness step between two tiles, at `position` (fraction of the side)."""
    out = f.copy()
    if vertical:
        cut = int(position * f.shape[1])
        out[:, cut:] = np.clip(out[:, cut:] * gain + shift, 0.0, 1.0)
    else:
        cut = int(position * f.shape[0])
        out[cut:, :] = np.clip(out[cut:, :] * gain + shift, 0.0, 1.0)
    return out


def resin(f: np.ndarray, level: float, shading: float = 0.0) -> np.ndarray:
    """Bare resin (no tissue): flat grey at `level`, optionally shaded left to right."""
    w = f.shape[1]
    ramp = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    return np.broadcast_to(level + shading * ramp, f.shape).astype(np.float32)


def _random_kinds() -> dict[str, Content]:
    """Each non-blur kind with random geometry in the ranges a real tile shows."""

    def side(f: np.ndarray) -> float:
        return float(min(f.shape))

    return {
        "fold": lambda f, r: fold(
            f, r.uniform(0, 360), r.uniform(-0.3, 0.3) * side(f), r.uniform(0.02, 0.08) * side(f), r.uniform(0.2, 0.6)
        ),
        "crack": lambda f, r: crack(
            f, r.uniform(0, 360), r.uniform(-0.3, 0.3) * side(f), r.uniform(2, 12), r.uniform(0.8, 1.0)
        ),
        "dirt": lambda f, r: dirt(
            f, r.uniform(0, f.shape[0]), r.uniform(0, f.shape[1]), r.uniform(0.03, 0.12) * side(f), r.uniform(0, 0.1)
        ),
        "section_edge": lambda f, r: section_edge(f, r.uniform(0, 360), r.uniform(-0.4, 0.2) * side(f)),
        "chatter": lambda f, r: chatter(f, r.uniform(8, 60), r.uniform(0.05, 0.3), r.uniform(0, 180)),
        "low_contrast": lambda f, r: low_contrast(
            f, math.exp(r.uniform(math.log(0.1), math.log(0.5))), r.uniform(0.2, 0.8)
        ),
        "inverted": lambda f, r: inverted(f),
        "charging": lambda f, r: charging(f, r.uniform(0, 360), r.uniform(0.4, 0.9), r.uniform(1.1, 1.5)),
        "seam": lambda f, r: seam(
            f, bool(r.integers(2)), r.uniform(0.2, 0.8), r.uniform(0.7, 1.4), r.uniform(-0.1, 0.1)
        ),
    }


RANDOM_KINDS: dict[str, Content] = _random_kinds()


def random_content(f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One non-blur kind, chosen uniformly, with random geometry; float32 in [0, 1]."""
    kind = list(RANDOM_KINDS)[int(rng.integers(len(RANDOM_KINDS)))]
    return np.clip(RANDOM_KINDS[kind](f, rng), 0.0, 1.0).astype(np.float32)
