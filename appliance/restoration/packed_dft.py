"""Filter a real image by a real frequency gain with OpenCV's packed real DFT (its CCS layout).

On a 2700 x 2700 float32 image (a 2400 px tile padded for the rig Wiener), the forward and inverse real DFT
took 0.069 s with cv2.dft / cv2.idft against 0.200 s with numpy.fft.rfft2 / irfft2 on one core of the 2-core
box (2026-11-27): the DFT pair was three quarters of the rig Wiener's time per tile.

cv2.dft packs the half spectrum of a real M x N image into M x N reals: columns 1, 2, ... hold (Re, Im) pairs
of the rfft2 columns 1..(N-1)//2 at every row; column 0, and column N-1 when N is even (the Nyquist column),
hold that rfft2 column's rows 0..M//2 as DC, (Re, Im) pairs and, when M is even, the Nyquist row's real part.
A real gain scales a coefficient's Re and Im alike.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np


@lru_cache(maxsize=8)
def _packed_rows(rows: int) -> np.ndarray:
    """Per row of a packed column (0, or N-1): the rfft2 row its value belongs to (0, 1, 1, 2, 2, ...)."""
    index = np.arange(1, rows + 1) // 2
    index[0] = 0
    index.flags.writeable = False
    return index


def filter_by_real_gain(image: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """irfft2(rfft2(image) * gain) for a float32 (M, N) image and a real gain on the rfft2 grid (M, N // 2 + 1)
    that is even (gain(-f) == gain(f), as a centred PSF's transfer and a power spectrum are): float32 (M, N).
    The packed layout keeps one of each pair of mirrored coefficients in columns 0 and N-1."""
    if image.ndim != 2 or gain.shape != (image.shape[0], image.shape[1] // 2 + 1):
        raise ValueError(f"gain {gain.shape} does not fit the rfft2 grid of an image {image.shape}")
    height, width = image.shape
    gain = np.asarray(gain, dtype=np.float32)
    spectrum = cv2.dft(np.ascontiguousarray(image, dtype=np.float32))
    pairs = (width - 1) // 2
    inner = gain[:, 1 : 1 + pairs]
    spectrum[:, 1 : 1 + 2 * pairs : 2] *= inner  # Re
    spectrum[:, 2 : 2 + 2 * pairs : 2] *= inner  # Im
    rows = _packed_rows(height)
    spectrum[:, 0] *= gain[rows, 0]
    if width % 2 == 0:
        spectrum[:, width - 1] *= gain[rows, width // 2]
    restored: np.ndarray = cv2.idft(spectrum, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return restored
