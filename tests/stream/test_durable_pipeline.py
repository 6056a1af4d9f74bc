"""Protocol v1.1 on the running appliance: restart + resend, retake loop, section lifecycle, storage
failures and a full disk. Real Ray Serve, real ZeroMQ on loopback, real files and filesystems."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from appliance.config import DeblurConfig, IngestConfig, MetricsConfig, OutputConfig, RigConfig
from appliance.qc_record import QC_FILENAME, QcRejection, QcStorageFailure, QcSuperseded, QcTileRecord, read_qc_lines
from appliance.stream.protocol import encode_end, encode_start
from appliance.tile_io import read_tile
from appliance.tools.reference_controller import ReferenceController, tile_frames
from bench.faults import fill_disk

pytestmark = pytest.mark.system

LOOPBACK = dict(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*")
SIDE = 256  # small tiles keep these tests quick; crops of the real sample tiles keep their labels


def rig(out: Path, **ingest: Any) -> RigConfig:
    return RigConfig(
        ingest=IngestConfig(**{**LOOPBACK, **ingest}),
        output=OutputConfig(directory=out),
        metrics=MetricsConfig(address="127.0.0.1:0"),
        deblur=DeblurConfig(backend="classical"),
    )


@pytest.fixture(scope="module")
def small_tiles(real_em_tiles: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    return [(name, np.ascontiguousarray(pixels[:SIDE, :SIDE])) for name, pixels in real_em_tiles]


def answers(feedback: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    return [m for m in feedback if m.get("section") == section and m["type"] in ("result", "error")]


def section_done(feedback: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    return [m for m in feedback if m["type"] == "section_done" and m["section"] == section]


def file_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tif"))}


def without_repeat(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "repeat"}


def assert_counts_add_up(done: dict[str, Any]) -> None:
    assert done["n_done"] == done["n_sharp"] + done["n_soft"] + done["n_retake"] + done["n_empty"] + done["n_error"]


def test_after_a_restart_a_resent_section_is_answered_once_from_the_index_and_nothing_is_rewritten(
    start_appliance: Callable[..., Any], tmp_path: Path, small_tiles: list[tuple[str, np.ndarray]]
) -> None:
    cfg = rig(tmp_path / "out")
    frames = [tile_frames("s1", f"t{seq}_{name}", seq, pixels) for seq, (name, pixels) in enumerate(small_tiles)]
    tile_ids = [f"t{seq}_{name}" for seq, (name, _) in enumerate(small_tiles)]
    first = start_appliance(cfg)
    with ReferenceController(first.endpoints.tile, first.endpoints.feedback) as controller:
        controller.send_raw(encode_start("s1", len(frames)))
        for message in frames:
            controller.send_raw(message)
        controller.send_raw(encode_end("s1", len(frames)))
        assert controller.wait_for(lambda fb: bool(section_done(fb, "s1")), timeout_s=120)
        before = controller.feedback()
    out = Path(first.endpoints.output_dir)
    done = section_done(before, "s1")[0]
    assert done["n_done"] == len(frames) and (done["n_rejected"], done["n_repeat"]) == (0, 0)
    assert_counts_add_up(done)
    hashes, qc_before = file_hashes(out), (out / QC_FILENAME).read_bytes()
    first.drain_and_stop()
    (out / "s1" / ".t0.tif.crashed.part").write_bytes(b"half a tile")  # what a crash mid-write leaves

    second = start_appliance(cfg)  # the same output directory: the sink rebuilds from index.sqlite
    with ReferenceController(second.endpoints.tile, second.endpoints.feedback) as controller:
        for message in frames:  # the controller got no answers (say): it resends the identical messages
            controller.send_raw(message)
        controller.send_raw(encode_end("s1", len(frames)))
        # The same tile_id under another seq and shape (the 2400 -> 512 px overwrite of issue 11): refused.
        other = np.ascontiguousarray(small_tiles[0][1][:64, :64])
        controller.send_raw(tile_frames("s1", tile_ids[0], 99, other))
        controller.send_raw(tile_frames("s1", "late_tile", 100, small_tiles[1][1]))  # after end: refused
        controller.send_raw(encode_start("s1"))  # an ended section cannot be reopened
        expected = len(frames) + 3
        assert controller.wait_for(
            lambda fb: len(answers(fb, "s1")) >= expected and bool(section_done(fb, "s1")), timeout_s=120
        ), controller.feedback()
        time.sleep(0.5)  # nothing more may come
        after = controller.feedback()
        stats = second.stats()["sink"]

    repeats = [m for m in answers(after, "s1") if m.get("repeat")]
    assert sorted(m["tile_id"] for m in repeats) == sorted(tile_ids)  # every tile answered exactly once
    first_answers = {m["tile_id"]: m for m in answers(before, "s1")}
    assert all(without_repeat(m) == first_answers[m["tile_id"]] for m in repeats)  # the recorded answer itself
    retakes_then = sorted((m for m in before if m["type"] == "retake"), key=lambda m: m["tile_id"])
    retakes_now = sorted((m for m in after if m["type"] == "retake"), key=lambda m: m["tile_id"])
    assert [without_repeat(m) for m in retakes_now] == retakes_then  # replies come in completion order
    assert all(m.get("repeat") for m in after if m["type"] == "retake")
    errors = sorted((m["code"], m["tile_id"] or "") for m in answers(after, "s1") if not m.get("repeat"))
    assert errors == [("duplicate_seq", tile_ids[0]), ("section_ended", ""), ("section_ended", "late_tile")]
    assert [without_repeat(m) for m in section_done(after, "s1")] == [done]  # the recorded section_done
    assert section_done(after, "s1")[0]["repeat"] is True

    assert file_hashes(out) == hashes  # no tile rewritten, the conflicting one included
    assert read_tile(out / "s1" / f"{tile_ids[0]}.tif").shape == (SIDE, SIDE)
    assert (out / QC_FILENAME).read_bytes().startswith(qc_before)
    new_lines = read_qc_lines(out / QC_FILENAME)[qc_before.count(b"\n") :]
    assert [type(line) for line in new_lines] == [QcRejection] * 3  # the refusals; no second tile record
    assert not list(out.rglob("*.part"))
    assert (stats["part_files_swept"], stats["repeat"]) == (1, len(frames) + 1)


def test_retake_loop_and_section_counts_with_malformed_messages_mixed_in(
    start_appliance: Callable[..., Any], tmp_path: Path, small_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(tmp_path / "out"))
    endpoints = appliance.endpoints
    sent = dict(small_tiles)
    sharp = sent["sharp_a"]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        controller.send_raw(encode_start("r1"))
        header = msgpack.unpackb(bytes(tile_frames("r1", "x", 50, sharp)[0]))
        malformed: list[list[Any]] = [
            [b"\xc1 not msgpack"],  # no section readable: attributed to none
            [msgpack.packb({**header, "seq": True}), bytes(sharp)],  # bad_field, section r1
            [msgpack.packb({**header, "seq": 51}), bytes(sharp)[:100]],  # bad_frame, section r1
        ]
        for index, (name, pixels) in enumerate(small_tiles):
            controller.send_tile("r1", name, pixels)
            if index < len(malformed):
                controller.send_raw(malformed[index])
        twin_id, twin_pixels = small_tiles[-1]  # resent at once: arrives while the first copy is in flight
        twin = tile_frames("r1", twin_id, len(small_tiles) - 1, twin_pixels)
        controller.send_raw(twin)
        controller.send_raw(tile_frames("r1", small_tiles[0][0], 77, sharp))  # tile_id reused: duplicate_seq
        controller.send_raw(encode_end("r1", len(small_tiles)))
        assert controller.wait_for(lambda fb: bool(section_done(fb, "r1")), timeout_s=120)
        done = section_done(controller.feedback(), "r1")[0]
        flagged = [m["tile_id"] for m in controller.feedback() if m["type"] == "retake"]
        assert flagged, "the beyond-repair samples are flagged"

        report = controller.retake_flagged("r1", acquire=lambda tile_id: sharp, timeout_s=60)

        # Errors of the retake loop: unknown tile, a tile already replaced, a plain tile after end.
        controller.send_raw(tile_frames("r1", "ghost.r1", 200, sharp, replaces="ghost"))
        controller.send_raw(tile_frames("r1", "again.r1", 201, sharp, replaces=flagged[0]))
        controller.send_raw(tile_frames("r1", "plain", 202, sharp))
        assert controller.wait_for(lambda fb: len([m for m in fb if m["type"] == "error"]) >= 7, timeout_s=60)
        feedback = controller.feedback()

    assert done["n_done"] == len(small_tiles) and done["n_repeat"] == 1
    twin_answers = [m for m in feedback if m["type"] == "result" and m["tile_id"] == twin_id]
    assert [bool(m.get("repeat")) for m in twin_answers] == [False, True]  # the first copy's answer, then one repeat
    assert done["n_rejected"] == 3  # bad_field + bad_frame + duplicate_seq; the unreadable one names no section
    assert done["n_retake"] == len(flagged)
    assert_counts_add_up(done)
    codes = sorted(m["code"] for m in feedback if m["type"] == "error")
    expected = ["bad_field", "bad_frame", "bad_message", "duplicate_seq", "section_ended"] + ["unknown_tile"] * 2
    assert codes == sorted(expected)

    assert (report.sent, report.done, report.lost, report.duplicated) == (len(flagged), len(flagged), 0, 0)
    assert report.results == {"sharp": len(flagged)}
    out = Path(endpoints.output_dir)
    results = {m["tile_id"]: m for m in feedback if m["type"] == "result"}
    lines = read_qc_lines(out / QC_FILENAME)
    for old in flagged:
        retake = next(m for m in results.values() if m.get("replaces") == old)
        assert retake["path"] == results[old]["path"] == f"r1/{old}.tif"  # delivered in place of the flagged tile
        np.testing.assert_array_equal(read_tile(out / retake["path"]), sharp)
        np.testing.assert_array_equal(read_tile(out / "r1" / "replaced" / f"{old}.tif"), sent[old])  # kept
        superseded = [x for x in lines if isinstance(x, QcSuperseded) and x.tile_id == old]
        assert [(x.superseded_by, x.path) for x in superseded] == [(retake["tile_id"], f"r1/replaced/{old}.tif")]
        record = next(x for x in lines if isinstance(x, QcTileRecord) and x.tile_id == retake["tile_id"])
        assert (record.replaces, record.label) == (old, "sharp")


def mount_read_only(path: Path) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)


def test_a_failed_write_is_answered_storage_failed_and_a_full_disk_holds_tiles_until_space_returns(
    small_disk: Path, start_appliance: Callable[..., Any], small_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(small_disk, max_in_flight=4, receive_hwm=1))
    endpoints = appliance.endpoints
    sharp = dict(small_tiles)["sharp_b"]
    with ReferenceController(endpoints.tile, endpoints.feedback, send_hwm=1) as controller:
        # 1. A section folder that cannot be written (a read-only filesystem): storage_failed, nothing delivered.
        mount_read_only(small_disk / "ro")
        stored = tile_frames("ro", "t0", 0, sharp)
        controller.send_raw(stored)
        controller.send_raw(encode_end("ro", 1))
        assert controller.wait_for(lambda fb: bool(section_done(fb, "ro")), timeout_s=60)
        subprocess.run(["umount", str(small_disk / "ro")], check=True)
        controller.send_raw(stored)  # the resend after the fault is stored, also after `end`
        assert controller.wait_for(lambda fb: len(answers(fb, "ro")) == 2, timeout_s=60)
        ro_feedback = controller.feedback()

        # 2. A full disk: tiles are held (no answer, no loss), one disk_full alarm, then disk_ok and results.
        filler = fill_disk(small_disk)
        tiles = [(f"f{i}", pixels) for i, (_, pixels) in enumerate(small_tiles[:3])]
        for seq, (tile_id, pixels) in enumerate(tiles):
            controller.send_raw(tile_frames("full", tile_id, seq, pixels))
        assert controller.wait_for(lambda fb: any(m.get("kind") == "disk_full" for m in fb), timeout_s=60)
        # A refused message still gets its error at once, although its QC record cannot be written now.
        header = msgpack.unpackb(bytes(tile_frames("full", "bad", 9, sharp)[0]))
        controller.send_raw([msgpack.packb({**header, "seq": True}), bytes(sharp)])
        assert controller.wait_for(lambda fb: any(m["type"] == "error" for m in answers(fb, "full")), timeout_s=30)
        time.sleep(2.5)  # retried every second meanwhile, the tiles keep their credits
        held = [m for m in answers(controller.feedback(), "full") if m["type"] == "result"]
        in_flight = appliance.stats()["ingest"]["in_flight"]
        filler.unlink()
        assert controller.wait_for(lambda fb: len(answers(fb, "full")) == len(tiles) + 1, timeout_s=60)
        controller.send_raw(encode_end("full", len(tiles)))
        assert controller.wait_for(lambda fb: bool(section_done(fb, "full")), timeout_s=60)
        full_feedback = controller.feedback()

    ro = answers(ro_feedback, "ro")
    assert ro[0]["code"] == "storage_failed" and "resend" in ro[0]["message"]
    assert ro[1]["type"] == "result" and not ro[1].get("repeat")
    done = section_done(ro_feedback, "ro")[0]
    assert (done["n_done"], done["n_error"]) == (1, 1)  # storage_failed counts as an error tile
    np.testing.assert_array_equal(read_tile(small_disk / "ro" / "t0.tif"), sharp)
    lines = read_qc_lines(small_disk / QC_FILENAME)  # every line whole: parsing would fail on a torn one
    assert [type(x) for x in lines if x.section == "ro"] == [QcStorageFailure, QcTileRecord]

    assert (held, in_flight) == ([], len(tiles))  # nothing answered while full; the tiles' credits held
    alarms = [m["kind"] for m in full_feedback if m["type"] == "alarm"]
    assert alarms == ["disk_full", "disk_ok"]
    full = answers(full_feedback, "full")
    assert [m["code"] for m in full if m["type"] == "error"] == ["bad_field"]
    assert sorted(m["tile_id"] for m in full if m["type"] == "result") == [tile_id for tile_id, _ in tiles]
    done = section_done(full_feedback, "full")[0]
    assert (done["n_done"], done["n_rejected"], done["n_error"]) == (len(tiles), 1, 0)
    lines = read_qc_lines(small_disk / QC_FILENAME)  # every line whole after the full disk too
    for tile_id, pixels in tiles:
        record = next(x for x in lines if isinstance(x, QcTileRecord) and x.tile_id == tile_id)
        if record.action == "written":
            np.testing.assert_array_equal(read_tile(small_disk / record.path), pixels)
    assert not list(small_disk.rglob("*.part"))


def n_answered(sink_stats: dict[str, int]) -> int:
    return sum(sink_stats.get(label, 0) for label in ("sharp", "soft", "retake", "error"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_reference_controller_resends_after_its_reply_timeout_and_counts_repeats_once(
    start_appliance: Callable[..., Any], tmp_path: Path, small_tiles: list[tuple[str, np.ndarray]]
) -> None:
    """The answers of a whole section are lost (the appliance restarts before the controller reads
    them): the controller resends after its reply timeout and gets each recorded answer once."""
    tile_endpoint, feedback_endpoint = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    out = tmp_path / "out"
    # The first appliance answers on a port the controller does not read: every answer is lost.
    first = start_appliance(rig(out, tile_endpoint=tile_endpoint))
    report_box: list[Any] = []
    with ReferenceController(tile_endpoint, feedback_endpoint) as controller:
        sender = threading.Thread(
            target=lambda: report_box.append(
                controller.send_section("c1", iter(small_tiles), rate_hz=None, timeout_s=150, reply_timeout_s=3)
            )
        )
        sender.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and n_answered(first.stats()["sink"]) < len(small_tiles):
            time.sleep(0.2)
        first.drain_and_stop()
        start_appliance(rig(out, tile_endpoint=tile_endpoint, feedback_endpoint=feedback_endpoint))
        sender.join(timeout=150)
    report = report_box[0]
    assert (report.sent, report.done, report.lost, report.duplicated) == (len(small_tiles), len(small_tiles), 0, 0)
    assert report.repeats >= len(small_tiles) and report.resent >= len(small_tiles)
    assert report.section_done is not None and report.section_done["repeat"] is True
    assert report.section_done["n_done"] == len(small_tiles)
    records = [x for x in read_qc_lines(out / QC_FILENAME) if isinstance(x, QcTileRecord)]
    assert sorted(x.tile_id for x in records) == sorted(name for name, _ in small_tiles)  # each written once
