"""Seconds per 2400 x 2400 tile of the rig Wiener (appliance/restoration/rig_wiener.py) on this CPU.

    python bench/rig_wiener_speed.py [--repeats 7] [--side 2400] [--family gaussian|disk] [--threads 2]

The rig: ISBI 2012 slices 22-26 (their spectrum and noise, as `calibrate` records them); the tile: slice 27
tiled up to the side and blurred by a Gaussian (or a disk) of sigma 2 px, as a soft MultiSEM-sized tile.
The filter's DFTs run in OpenCV (appliance/restoration/packed_dft.py), held here to one thread of its own
(2 gave the same figures on the 2-core box), so this is the cost on one core of the deblur replica's CPU, per
soft tile of a calibrated rig. With --threads N it also restores batches of 2N tiles on N threads, as a deblur replica
reserving N CPUs does (TileRestorer), and reports tiles/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is not installed

from appliance import spectral  # noqa: E402
from appliance.detection.calibration import noise_level  # noqa: E402
from appliance.restoration.rig_wiener import rig_wiener  # noqa: E402
from appliance.tile_io import read_tile  # noqa: E402
from models.blur_synth import DATA_DIR, BlurParams, psf_kernel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--side", type=int, default=2400)
    parser.add_argument("--family", choices=("gaussian", "disk"), default="gaussian", help="the blur (sigma 2 px)")
    parser.add_argument("--threads", type=int, default=0, help="also time batches on this many threads")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core per tile, as the docstring says
    rig = [read_tile(DATA_DIR / f"{i}.png") for i in range(22, 27)]
    reference = spectral.reference_log_power([s for s in map(spectral.window_spectra, rig) if s is not None])
    own_noise = float(np.median([noise_level(t) for t in rig])) ** 2
    slice_27 = read_tile(DATA_DIR / "27.png")
    reps = -(-args.side // slice_27.shape[0])
    sharp = np.tile(slice_27, (reps, reps))[: args.side, : args.side]
    tile = cv2.filter2D(sharp, -1, psf_kernel(BlurParams(args.family, 2.0)).astype(np.float32))
    spectra = spectral.window_spectra(tile)
    psf = None if spectra is None else spectral.fit_added_psf(spectra, *reference)
    rig_wiener(tile, reference, own_noise)  # first call: caches and allocations
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        rig_wiener(tile, reference, own_noise)
        seconds.append(time.perf_counter() - started)
    result = {
        "tile": f"{args.side}x{args.side} uint8, {args.family} sigma 2 px, read as {psf and psf.kind}",
        "best_s": round(min(seconds), 3),
        "median_s": round(float(np.median(seconds)), 3),
        "repeats": args.repeats,
        **(_threaded(tile, reference, own_noise, args.threads, args.repeats) if args.threads > 0 else {}),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    print(json.dumps(result))


def _threaded(
    tile: np.ndarray, reference: spectral.SpectralReferenceArrays, own_noise: float, threads: int, repeats: int
) -> dict[str, object]:
    """Tiles/s of batches of 2 x threads copies of `tile` on `threads` threads (best of `repeats`)."""
    batch = [tile.copy() for _ in range(2 * threads)]
    rates = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda t: rig_wiener(t, reference, own_noise), batch))
            rates.append(len(batch) / (time.perf_counter() - started))
    return {"threads": threads, "batch": len(batch), "best_tiles_per_s": round(max(rates), 2)}


if __name__ == "__main__":
    main()
