"""Filter a real image by a real frequency gain with OpenCV's packed real DFT (its CCS layout).

On a 2700 x 2700 float32 image (a 2400 px tile padded for the rig Wiener), the forward and inverse real DFT
took 0.069 s with cv2.dft / cv2.idft against 0.200 s with numpy.fft.rfft2 / irfft2 on one core of the 2-core
box (2026-11-27): the FFT pair was three quarters of the rig Wiener's time per tile.

cv2.dft packs the half spectrum of a real M x N image into M x N reals: columns 1.. hold (Re, Im) pairs of
the rfft2 columns 1..(N-1)//2 at every row; column 0, and column N-1 when N is even (the Nyquist column),
hold that rfft2 column's rows 0..M//2 as DC, (Re, Im) pairs and, when M is even, the Nyquist row's real part.
A real gain scales a coefficient's Re and Im alike, so the gain in that layout is a gather from the rfft2 grid.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np


@lru_cache(maxsize=8)
def packed_index(shape: tuple[int, int]) -> np.ndarray:
    """Per element of cv2.dft's packed spectrum of a real `shape` image: the flat index of its coefficient on
    the rfft2 grid (M, N // 2 + 1). int32, read-only (shared between threads)."""
    m, n = shape
    half = n // 2 + 1
    rows = np.broadcast_to(np.arange(m)[:, None], (m, n)).copy()
    cols = np.zeros((m, n), dtype=np.int64)
    cols[:, 1 : 1 + 2 * ((n - 1) // 2)] = np.repeat(np.arange(1, (n - 1) // 2 + 1), 2)[None, :]
    packed_rows = np.zeros(m, dtype=np.int64)  # row 0: DC; then (Re, Im) of rows 1, 2, ...; Nyquist row last
    packed_rows[1:] = np.arange(2, m + 1) // 2
    packed_columns = [0] + ([n - 1] if n % 2 == 0 else [])
    for column in packed_columns:
        rows[:, column] = packed_rows
        cols[:, column] = 0 if column == 0 else n // 2
    index = (rows * half + cols).astype(np.int32)
    index.flags.writeable = False
    return index


def filter_by_real_gain(image: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """irfft2(rfft2(image) * gain) for a float32 (M, N) image and a real gain on the rfft2 grid (M, N // 2 + 1)
    that is even (gain(-f) == gain(f), as a centred PSF's transfer and a power spectrum are): float32 (M, N).
    The packed layout holds one of each pair of mirrored coefficients in columns 0 and N-1."""
    if image.ndim != 2 or gain.shape != (image.shape[0], image.shape[1] // 2 + 1):
        raise ValueError(f"gain {gain.shape} does not fit the rfft2 grid of an image {image.shape}")
    spectrum = cv2.dft(np.ascontiguousarray(image, dtype=np.float32))
    spectrum *= np.ascontiguousarray(gain, dtype=np.float32).ravel()[packed_index(image.shape)]
    restored: np.ndarray = cv2.idft(spectrum, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return restored
