"""A tile written to a full filesystem fails as ENOSPC (backpressure), whatever layer reports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.tile_io import is_disk_full, write_tile_atomic

pytestmark = pytest.mark.system  # mounts a real tmpfs


def test_a_multisem_tile_on_a_full_disk_is_enospc_and_leaves_no_temp_file(small_disk: Path) -> None:
    # 5.76 MB into 4 MiB: numpy's tofile reports a short write without errno; it must read as disk full.
    tile = np.full((2400, 2400), 7, np.uint8)
    with pytest.raises(OSError) as info:
        write_tile_atomic(small_disk / "s1" / "t0.tif", tile, fsync=True)
    assert is_disk_full(info.value), repr(info.value)
    assert not list(small_disk.rglob("*.part")) and not (small_disk / "s1" / "t0.tif").exists()
    small = np.full((256, 256), 7, np.uint8)  # space is back as soon as the temp file is gone
    write_tile_atomic(small_disk / "s1" / "t1.tif", small, fsync=True)
    assert (small_disk / "s1" / "t1.tif").is_file()
