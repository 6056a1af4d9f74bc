"""Make the demo's bundled sample tiles (appliance/tools/sample_tiles/) from held-out real EM.

Sharp tiles are the ISBI 2012 test-split images as acquired; soft and retake tiles are the same images
through models.blur_synth (seeded), so the demo exercises every path: write, restore, flag for retake.
Reproduce: `python -m models.make_sample_tiles`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from models.blur_synth import BlurParams, load_image, load_split, synthesize

OUT_DIR = Path(__file__).resolve().parents[1] / "appliance" / "tools" / "sample_tiles"

# (file stem, test-split index, blur or None); strengths chosen inside/outside the restorable range.
SAMPLES: tuple[tuple[str, int, BlurParams | None], ...] = (
    ("sharp_a", 0, None),
    ("sharp_b", 1, None),
    ("sharp_c", 2, None),
    ("sharp_d", 3, None),
    ("soft_gaussian_s1.5", 0, BlurParams("gaussian", 1.5)),
    ("soft_astigmatic_s2.0", 1, BlurParams("astigmatic", 2.0, anisotropy=2.0, angle_deg=30.0)),
    ("retake_gaussian_s6.0", 2, BlurParams("gaussian", 6.0)),
    ("retake_tilted_s8.0", 3, BlurParams("tilted", 8.0, angle_deg=0.0)),
)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    images = [load_image(path) for path in load_split("test")]
    rng = np.random.default_rng(2012)
    for stem, index, params in SAMPLES:
        pixels = images[index] if params is None else synthesize(images[index], params, rng, noise=True)
        cv2.imwrite(str(OUT_DIR / f"{stem}.png"), pixels)
        print(f"{OUT_DIR / stem}.png")


if __name__ == "__main__":
    main()
