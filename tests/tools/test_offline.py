"""`deblur --out` never overwrites an acquired file or another output, and says why in one line (real files)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.tile_io import read_tile, write_tile_atomic
from appliance.tools.cli import app
from appliance.tools.demo import SAMPLE_DIR
from appliance.tools.offline import check_deblur_outputs, prepare_out_dir

pytestmark = pytest.mark.fast

SOFT = SAMPLE_DIR / "soft_gaussian_s1.5.png"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deblur(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["deblur", *args])
    return result.exit_code, result.output


def test_out_being_an_inputs_folder_is_refused_and_the_acquired_file_kept(tmp_path: Path) -> None:
    acquired = tmp_path / "tile.tif"  # deblur would write <out>/tile.tif: the acquired file itself
    write_tile_atomic(acquired, read_tile(SOFT))
    before = digest(acquired)
    code, output = deblur(str(acquired), "--out", str(tmp_path))
    assert code == 2
    assert output.strip() == (
        f"error: --out {tmp_path} is the folder of the input {acquired}: the restored TIFF could overwrite "
        "the acquired file; choose another folder"
    )
    assert digest(acquired) == before and "Traceback" not in output


def test_two_inputs_with_the_same_stem_are_refused_naming_both(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "tile.png", tmp_path / "b" / "tile.png"
    shutil.copy(SOFT, first)
    shutil.copy(SOFT, second)
    problems = check_deblur_outputs([first, second], tmp_path / "out")
    assert problems == [
        f"inputs {first} and {second} would both be written to {tmp_path / 'out' / 'tile.tif'}; "
        "rename one or run them apart"
    ]
    code, output = deblur(str(first), str(second), "--out", str(tmp_path / "out"))
    assert code == 2 and output.count("error:") == 1 and str(first) in output and str(second) in output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_unwritable_out_ends_in_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where --out's parent should be")
    code, output = deblur(str(SOFT), "--out", str(blocker / "restored"))
    assert code == 2
    assert output.strip() == f"error: --out {blocker / 'restored'}: cannot write there: Not a directory"
    assert check_deblur_outputs([SOFT], tmp_path / "fine") == [] and not (tmp_path / "fine").exists()
    assert prepare_out_dir(tmp_path / "fine") is None and (tmp_path / "fine").is_dir()
