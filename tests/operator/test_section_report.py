"""The section QC report: figures from QC rows, the HTML page, and the page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from appliance.operator.report_figures import Thresholds, focus_map_figure, tile_polygons
from appliance.operator.section_qc import TileQc, read_sections
from appliance.operator.section_report import beam_rows, render_section_report, write_section_report

TIER = "fast"  # this module's default tier (tests/conftest.py); tests of the other tier are marked

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def tile(seq: int, sigma: float | None, action: str = "written", **fields: object) -> TileQc:
    """A 512x512 tile at 4 nm/px (2.048 µm) on a 10-wide grid with 10 % overlap."""
    label = None if sigma is None else "sharp" if sigma <= 0.8 else "soft" if sigma <= 3 else "retake"
    base = TileQc(
        tile_id=f"t{seq:04d}",
        seq=seq,
        stage_x_um=(seq % 10) * 1.8432,
        stage_y_um=(seq // 10) * 1.8432,
        width_um=2.048,
        height_um=2.048,
        label=label,
        action=action,
        sigma_px=sigma,
        blur_score=None if sigma is None else min(1.0, sigma / 6),
        beam=seq % 3,
        t_acquired=1000.0 + seq * 0.04,
        t_done=1000.5 + seq * 0.04,
        path=f"s1/t{seq:04d}.tif",
        reason="",
        empty=False,
        detector_version="blurnet-v1",
        deblur_version="nafnet" if action == "restored" else None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def section_tiles(count: int = 60) -> list[TileQc]:
    tiles = []
    for seq in range(count):
        if seq % 10 == 3:
            tiles.append(tile(seq, 1.6, "restored"))
        elif seq % 10 == 7:
            tiles.append(tile(seq, 4.8, "flagged", reason="blur sigma 4.8 px exceeds restorable 3.0 px"))
        elif seq == 11:
            tiles.append(
                tile(
                    seq,
                    0.0,
                    "flagged",
                    label="retake",
                    empty=True,
                    reason="not judgeable: almost no structure above the noise",
                )
            )
        elif seq == 12:
            tiles.append(tile(seq, None, "failed", reason="RuntimeError: model crashed"))
        else:
            tiles.append(tile(seq, 0.3 + 0.01 * seq))
    return tiles


def test_focus_map_draws_every_tile_at_its_stage_position() -> None:
    tiles = section_tiles(60)
    figure = focus_map_figure(tiles, Thresholds())
    drawn = next(c for c in figure.axes[0].collections if c.get_gid() == "tiles")
    assert isinstance(drawn, PolyCollection)
    polygons = drawn.get_paths()
    assert len(polygons) == len(tiles)
    centres = np.array([path.vertices[:4].mean(axis=0) for path in polygons])
    np.testing.assert_allclose(centres, [[t.stage_x_um, t.stage_y_um] for t in tiles], atol=1e-9)
    sides = np.ptp(tile_polygons(tiles[:1])[0], axis=0)
    np.testing.assert_allclose(sides, [2.048, 2.048])
    # Sigma is the fill; the tile with no estimate is masked (drawn grey), not dropped.
    values = drawn.get_array()
    assert values.count() == len(tiles) - 1 and values[12] is np.ma.masked


def test_report_page_has_counts_beams_and_linked_retakes(tmp_path: Path) -> None:
    tiles = section_tiles(60)
    page = render_section_report("s1", tiles, tmp_path, tmp_path / "s1", Thresholds())
    assert 'data-tiles="60"' in page
    assert page.count("data:image/png;base64,") == 3
    # 6 retakes by sigma, 1 empty, 1 failed; links relative to the report's folder.
    assert "Retakes and failures (8)" in page
    assert '<a href="t0007.tif">s1/t0007.tif</a>' in page
    assert "not judgeable" in page and "RuntimeError: model crashed" in page
    assert "<script" not in page  # self-contained and inert
    rows = {row[0]: row for row in beam_rows(tiles)}
    assert set(rows) == {"0", "1", "2"} and sum(int(row[1]) for row in rows.values()) == 60
    assert {row[-1] for row in rows.values()} == {"n/a"}  # uncalibrated: no baseline
    # Calibrated: the baseline the beam's last tile (by seq) was judged against.
    judged = [replace(t, baseline_sigma_px=1.0 + t.seq / 100) for t in tiles]
    last = max(t.seq for t in judged if t.beam == 1)
    assert {row[0]: row for row in beam_rows(judged)}["1"][-1] == f"{1.0 + last / 100:.2f}"


def test_report_of_an_empty_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="section 's9' has no tiles"):
        render_section_report("s9", [], tmp_path, tmp_path, Thresholds())


def test_read_sections_skips_refused_messages_and_names_a_bad_line(tmp_path: Path) -> None:
    record = {
        "t": 2.0,
        "section": "a",
        "tile_id": "x",
        "seq": 0,
        "action": "written",
        "path": "a/x.tif",
        "shape": [512, 512],
        "pixel_size_nm": 4.0,
        "stage_x_um": 1.0,
        "stage_y_um": 2.0,
        "t_acquired": 1.0,
        "label": "sharp",
        "sigma_px": 0.2,
        "blur_score": 0.0,
        "beam": 4,
    }
    rejected = {"t": 2.0, "section": "a", "tile_id": None, "seq": 5, "action": "rejected", "code": "bad_frame"}
    qc = tmp_path / "qc.jsonl"
    qc.write_text("\n".join(json.dumps(r) for r in (record, rejected, {**record, "section": "b"})) + "\n")
    sections = read_sections(qc)
    assert {name: len(rows) for name, rows in sections.items()} == {"a": 1, "b": 1}
    assert sections["a"][0].beam == 4 and sections["a"][0].width_um == pytest.approx(2.048)
    assert list(read_sections(qc, "b")) == ["b"]
    qc.write_text(json.dumps(record) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"qc.jsonl:2: not a QC record"):
        read_sections(qc)


# Appended to a copy of the report only: reports whether the browser decoded every embedded image.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const pre = document.createElement('pre'); pre.id = 'probe';
  const decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  pre.textContent = JSON.stringify({n: imgs.length, decoded: decoded});
  document.body.appendChild(pre);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser (Debian: apt-get install chromium)")
@pytest.mark.system
def test_report_opens_in_headless_chromium_with_every_image_decoded(tmp_path: Path) -> None:
    out = write_section_report("s1", section_tiles(60), tmp_path, tmp_path / "s1" / "report.html", Thresholds())
    probed = out.with_name("probed.html")
    probed.write_text(out.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    browser = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
        "--window-size=1200,2400",
    ]
    dom = subprocess.run([*browser, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=60)
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert probe, dom.stderr[-2000:]
    assert json.loads(probe.group(1).replace("&quot;", '"')) == {"n": 3, "decoded": 3}
    assert "QC report: section s1" in dom.stdout and 'data-tiles="60"' in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=60, check=True)
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000, "screenshot is blank or missing"
