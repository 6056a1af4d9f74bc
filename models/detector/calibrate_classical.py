"""Measure the classical backend's calibration table (raw re-blur sigma -> true added sigma).

    python -m models.detector.calibrate_classical

Prints the median raw estimate per true Gaussian sigma on the training split; the numbers are pasted
into appliance/blur_detection.py (_CLASSICAL_RAW / _CLASSICAL_TRUE). Raw values must rise with sigma;
where most patches have no usable edges the table stops (the runtime then extrapolates flat).
"""

from __future__ import annotations

import numpy as np

from appliance.blur_detection import ClassicalBackend, extract_patches
from models.blur_synth import BlurParams, load_image, load_split, synthesize

SIGMAS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def main() -> None:
    backend = ClassicalBackend()
    images = [load_image(p) for p in load_split("train")]
    rng = np.random.default_rng(0)
    print("true_sigma  median_raw  usable_patch_share")
    for sigma in SIGMAS:
        raws, usable = [], []
        for image in images:
            params = BlurParams("gaussian", sigma) if sigma > 0 else None
            patches, _ = extract_patches(synthesize(image, params, rng))
            for patch in patches:
                raw, weight = backend.raw_sigma(patch)
                usable.append(weight > 0)
                if weight > 0:
                    raws.append(raw)
        median = float(np.median(raws)) if raws else float("nan")
        print(f"{sigma:10.1f}  {median:10.2f}  {np.mean(usable):18.2f}")


if __name__ == "__main__":
    main()
