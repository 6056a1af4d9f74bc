"""Tile pixels on disk: read PNG/TIFF, check they are a usable EM tile, write TIFF atomically."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import cv2
import numpy as np
import tifffile

PART_SUFFIX = ".part"
SUPPORTED_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint16))
MIN_TILE_SIDE = 32


class TileError(ValueError):
    """A tile cannot be processed; the message names the tile and the problem."""


def check_tile_pixels(pixels: np.ndarray, name: str) -> None:
    """Raise TileError unless `pixels` is a 2-D uint8/uint16 image with some contrast.

    Shapes are (height, width); tiles smaller than MIN_TILE_SIDE px on a side cannot be judged.
    """
    if not isinstance(pixels, np.ndarray):
        raise TileError(f"{name}: expected a numpy array, got {type(pixels).__name__}")
    if pixels.dtype not in SUPPORTED_DTYPES:
        raise TileError(f"{name}: unsupported dtype {pixels.dtype}; send uint8 or uint16 grayscale")
    if pixels.ndim != 2:
        raise TileError(f"{name}: expected a 2-D grayscale image, got shape {pixels.shape}")
    if pixels.size == 0:
        raise TileError(f"{name}: empty image (shape {pixels.shape})")
    if min(pixels.shape) < MIN_TILE_SIDE:
        raise TileError(f"{name}: tile {pixels.shape} is smaller than {MIN_TILE_SIDE} px on a side")
    # A constant tile (beam blanked, detector off) carries no focus information at all.
    if int(pixels.max()) == int(pixels.min()):
        raise TileError(f"{name}: constant image (every pixel = {int(pixels.flat[0])}); nothing to judge")


def read_tile(path: Path) -> np.ndarray:
    """Read a PNG or TIFF tile as a 2-D uint8/uint16 array (H, W); raise TileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            pixels = tifffile.imread(path)
        elif suffix == ".png":
            decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if decoded is None:
                raise TileError(f"{path}: not a readable PNG")
            pixels = decoded
        else:
            raise TileError(f"{path}: unsupported file type {suffix!r}; use .png, .tif or .tiff")
    except TileError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise TileError(f"{path}: cannot read image: {exc}") from exc
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4) and _channels_equal(pixels):
        # Grayscale saved as RGB(A) by some viewers: accept, since no information is lost.
        pixels = np.ascontiguousarray(pixels[:, :, 0])
    check_tile_pixels(pixels, str(path))
    return pixels


def _channels_equal(pixels: np.ndarray) -> bool:
    return bool(np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]))


def write_tile_atomic(path: Path, pixels: np.ndarray, fsync: bool = True) -> None:
    """Write `pixels` as TIFF at `path` via temp file + rename, so a reader never sees half a tile."""
    path = Path(path)
    ensure_dir(path.parent, fsync)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); delivered tiles are for the facility to read.
        os.chmod(tmp_name, 0o644)
        tifffile.imwrite(tmp_name, pixels, photometric="minisblack")
        if fsync:
            _fsync_path(Path(tmp_name))
        os.replace(tmp_name, path)
    except OSError as exc:
        # numpy's tofile (under tifffile) reports a full disk as a short write without errno
        # ("5760000 requested and 5504768 written"): name it ENOSPC, so it is backpressure, not a failure.
        full = exc.errno is None and shutil.disk_usage(path.parent).free < pixels.nbytes
        Path(tmp_name).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on the device writing {path.name} ({exc})") from exc
        raise
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if fsync:
        # The rename is durable only once the directory entry is on disk.
        _fsync_path(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, fsync: bool = True) -> None:
    """Create `path` and missing parents; with fsync, each new entry is made durable in its parent.

    A tile renamed into a new section folder is durable only once the folder itself is on disk.
    """
    path = Path(path)
    missing: list[Path] = []
    while not path.exists():  # an existing file in the way makes mkdir fail with NotADirectoryError
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for new_dir in reversed(missing):
        new_dir.mkdir(exist_ok=True)
        if fsync:
            _fsync_path(new_dir.parent)


def move_durably(source: Path, target: Path, fsync: bool = True) -> None:
    """Rename `source` to `target` (same filesystem), creating target's folder; both folders fsynced."""
    ensure_dir(target.parent, fsync)
    os.replace(source, target)
    if fsync:
        _fsync_path(target.parent)
        _fsync_path(source.parent)


def sweep_part_files(output_dir: Path) -> int:
    """Remove temp files (`.*.part`) that a crash left in the section folders; returns how many.

    Only the sink writes there and it calls this before its first write, so no live write is touched.
    Looks two levels deep (<section>/, <section>/originals/, <section>/replaced/), not the whole tree.
    """
    removed = 0
    for pattern in (f"*/.*{PART_SUFFIX}", f"*/*/.*{PART_SUFFIX}"):
        for part in Path(output_dir).glob(pattern):
            part.unlink(missing_ok=True)
            removed += 1
    return removed


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write means "no space left" (ENOSPC, EDQUOT, or SQLite's SQLITE_FULL)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
