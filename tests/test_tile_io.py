"""Tile files on disk: new folders made durable, temp files swept, disk-full recognised (real files)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from appliance.tile_io import ensure_dir, is_disk_full, move_durably, read_tile, sweep_part_files, write_tile_atomic

pytestmark = pytest.mark.fast


def test_part_files_left_by_a_crash_are_swept_and_tiles_kept(tmp_path: Path) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    write_tile_atomic(tmp_path / "s1" / "t0.tif", pixels)
    for leftover in ("s1/.t1.tif.abc.part", "s1/originals/.t2.tif.def.part", "s2/replaced/.t3.tif.x.part"):
        ensure_dir((tmp_path / leftover).parent)
        (tmp_path / leftover).write_bytes(b"half a tile")
    assert sweep_part_files(tmp_path) == 3
    assert not list(tmp_path.rglob("*.part"))
    np.testing.assert_array_equal(read_tile(tmp_path / "s1" / "t0.tif"), pixels)
    assert sweep_part_files(tmp_path) == 0


def test_move_durably_keeps_the_file_under_its_new_name(tmp_path: Path) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    write_tile_atomic(tmp_path / "s1" / "t0.tif", pixels)
    move_durably(tmp_path / "s1" / "t0.tif", tmp_path / "s1" / "replaced" / "t0.tif")
    assert not (tmp_path / "s1" / "t0.tif").exists()
    np.testing.assert_array_equal(read_tile(tmp_path / "s1" / "replaced" / "t0.tif"), pixels)


def test_disk_full_is_recognised_from_the_os_and_from_sqlite(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EROFS, "Read-only file system"))
    db = sqlite3.connect(tmp_path / "full.sqlite")
    db.execute("PRAGMA max_page_count = 2")  # SQLite's own size cap raises SQLITE_FULL, as a full disk does
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("CREATE TABLE t (b BLOB)")
        db.execute("INSERT INTO t VALUES (?)", (bytes(100_000),))
    assert is_disk_full(full.value)
    with pytest.raises(sqlite3.OperationalError) as other:
        db.execute("SELECT * FROM no_such_table")
    assert not is_disk_full(other.value)
