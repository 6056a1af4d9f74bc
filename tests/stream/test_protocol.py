"""Wire protocol v1.1: round trips and every kind of bad input gets its error code (no sockets)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from appliance.stream.protocol import (
    ALARM_KINDS,
    ERROR_CODES,
    MAX_HEADER_BYTES,
    ProtocolError,
    SectionEnd,
    SectionStart,
    StreamLimits,
    Tile,
    TileHeader,
    as_repeat,
    decode_feedback,
    decode_stream_message,
    encode_end,
    encode_feedback,
    encode_start,
    encode_tile,
)

pytestmark = pytest.mark.fast

LIMITS = StreamLimits(max_tile_bytes=1 << 20, max_tile_side=4096)


def tile_header(**overrides: object) -> TileHeader:
    fields: dict[str, object] = dict(
        v=1,
        type="tile",
        section="sec-001",
        tile_id="tile_000042",
        seq=42,
        shape=[64, 96],
        dtype="uint16",
        pixel_size_nm=4.0,
        stage_x_um=-12.5,
        stage_y_um=3.0,
        t_acquired=1.7e9,
        t_sent=1.7e9 + 0.1,
    )
    fields.update(overrides)
    return TileHeader(**fields)  # type: ignore[arg-type]


def raw_header(**overrides: object) -> bytes:
    fields = tile_header().model_dump()
    fields.update(overrides)
    return msgpack.packb({k: v for k, v in fields.items() if v is not ...})


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_tile_round_trips_bit_exact(dtype: str) -> None:
    pixels = (np.arange(64 * 96, dtype=np.uint32) * 37 % np.iinfo(dtype).max).astype(dtype).reshape(64, 96)
    header = tile_header(dtype=dtype)
    message = decode_stream_message([bytes(f) for f in encode_tile(header, pixels)], LIMITS)
    assert isinstance(message, Tile)
    assert message.header == header
    assert message.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(message.pixels, pixels)


def test_start_and_end_round_trip() -> None:
    start = decode_stream_message(encode_start("sec-001", 45750), LIMITS)
    end = decode_stream_message(encode_end("sec-001", 45750), LIMITS)
    assert isinstance(start, SectionStart) and start.expected_tiles == 45750
    assert isinstance(end, SectionEnd) and end.n_tiles == 45750


def test_feedback_round_trips_and_rejects_unknown_keys() -> None:
    frame = encode_feedback("retake", section="s", tile_id="t", seq=1, reason="blur too strong", blur_score=0.9)
    assert decode_feedback(frame)["reason"] == "blur too strong"
    with pytest.raises(ValueError, match="needs keys"):
        encode_feedback("retake", section="s")
    with pytest.raises(ProtocolError) as info:
        decode_feedback(msgpack.packb({"v": 1, "type": "retake", "section": "s", "surprise": 1}))
    assert info.value.code == "bad_field"


PIXELS_64x96_U16 = bytes(64 * 96 * 2)


@pytest.mark.parametrize(
    ("frames", "code", "fragment"),
    [
        ([b"\xc1garbage"], "bad_message", "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], "bad_message", "must be a msgpack map"),
        ([b"\x80" + b"\x00" * MAX_HEADER_BYTES], "bad_message", "limit"),
        ([raw_header(v=2), PIXELS_64x96_U16], "unknown_version", "version 2"),
        ([raw_header(type="image"), PIXELS_64x96_U16], "unknown_type", "'image'"),
        ([raw_header()], "bad_message", "2 frame(s), got 1"),
        ([raw_header(dtype="float32"), PIXELS_64x96_U16], "bad_field", "dtype"),
        ([raw_header(seq="42"), PIXELS_64x96_U16], "bad_field", "seq"),
        ([raw_header(seq=True), PIXELS_64x96_U16], "bad_field", "seq"),
        ([raw_header(tile_id="../../etc/passwd"), PIXELS_64x96_U16], "bad_field", "tile_id"),
        ([raw_header(colour="red"), PIXELS_64x96_U16], "bad_field", "colour"),
        ([raw_header(pixel_size_nm=...), PIXELS_64x96_U16], "bad_field", "pixel_size_nm"),
        ([raw_header(stage_x_um=float("nan")), PIXELS_64x96_U16], "bad_field", "stage_x_um"),
        ([raw_header(t_acquired=float("inf")), PIXELS_64x96_U16], "bad_field", "t_acquired"),
        ([raw_header(pixel_size_nm=float("inf")), PIXELS_64x96_U16], "bad_field", "pixel_size_nm"),
        ([raw_header(seq=1.0), PIXELS_64x96_U16], "bad_field", "seq"),
        ([raw_header(shape=[64.0, 96.0]), PIXELS_64x96_U16], "bad_field", "shape"),
        ([raw_header(section="qc.jsonl"), PIXELS_64x96_U16], "bad_field", "reserved"),
        ([raw_header(shape=[64]), PIXELS_64x96_U16], "bad_field", "shape"),
        ([raw_header(), PIXELS_64x96_U16[:-10]], "bad_frame", "truncated"),
        ([raw_header(shape=[8, 8]), bytes(128)], "bad_field", "minimum"),
        ([raw_header(shape=[5000, 64]), bytes(5000 * 64 * 2)], "oversized", "side limit"),
        ([raw_header(shape=[4096, 4096], dtype="uint8"), bytes(4096 * 4096)], "oversized", "bytes"),
    ],
)
def test_bad_input_gets_its_error_code(frames: list[bytes], code: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_stream_message(frames, LIMITS)
    assert info.value.code == code
    assert fragment in info.value.message


def test_error_echoes_identifying_fields_of_a_bad_tile() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_stream_message([raw_header(), PIXELS_64x96_U16[:100]], LIMITS)
    assert info.value.context == {"section": "sec-001", "tile_id": "tile_000042", "seq": 42}


def test_encode_refuses_pixels_that_disagree_with_the_header() -> None:
    with pytest.raises(ValueError, match="do not match"):
        encode_tile(tile_header(), np.zeros((64, 96), np.uint8))


def test_beam_is_optional_and_validated() -> None:
    pixels = np.zeros((64, 96), np.uint16)
    for beam in (None, 0, 90):
        message = decode_stream_message([bytes(f) for f in encode_tile(tile_header(beam=beam), pixels)], LIMITS)
        assert isinstance(message, Tile) and message.header.beam == beam
    without = {k: v for k, v in tile_header().model_dump().items() if k != "beam"}  # an older controller
    message = decode_stream_message([msgpack.packb(without), bytes(64 * 96 * 2)], LIMITS)
    assert isinstance(message, Tile) and message.header.beam is None
    for bad in (-1, "3", 1.0, 70000):
        with pytest.raises(ProtocolError, match="beam") as info:
            decode_stream_message([raw_header(beam=bad), bytes(64 * 96 * 2)], LIMITS)
        assert info.value.code == "bad_field"


def test_alarm_feedback_and_the_optional_restore_suspended_key_of_a_result() -> None:
    alarm = dict(
        kind="implausible_blur_share", section="s", tile_id="t", seq=49, n_judged=50, n_soft=30, n_retake=2,
        share=0.64, threshold=0.5, min_tiles=50, calibrated=False, message="restoring suspended",
    )  # fmt: skip
    assert decode_feedback(encode_feedback("alarm", **alarm))["kind"] == "implausible_blur_share"
    focus = dict(
        kind="focus_drift", section="s", tile_id="t", seq=9, beam=None, baseline_sigma_px=2.1,
        reference_sigma_px=1.5, drift_log=0.27, threshold=0.25, pixel_size_nm=4.0, calibrated=True, message="m",
    )  # fmt: skip
    for kind in ("focus_drift", "focus_ok"):
        assert decode_feedback(encode_feedback("alarm", **{**focus, "kind": kind}))["beam"] is None
    with pytest.raises(ValueError, match="alarm feedback needs keys"):
        encode_feedback("alarm", **{k: v for k, v in focus.items() if k != "beam"})
    with pytest.raises(ValueError, match="alarm feedback needs keys"):
        encode_feedback("alarm", **{k: v for k, v in alarm.items() if k != "message"})
    result = dict(
        section="s", tile_id="t", seq=1, label="soft", action="written", blur_score=0.4, sigma_px=1.3,
        path="s/t.tif", latency_s=0.1,
    )  # fmt: skip
    assert "restore_suspended" not in decode_feedback(encode_feedback("result", **result))
    assert decode_feedback(encode_feedback("result", **result, restore_suspended=True))["restore_suspended"] is True
    with pytest.raises(ProtocolError):  # optional for a result only
        decode_feedback(msgpack.packb({"v": 1, "type": "retake", **result, "restore_suspended": True}))


def test_replaces_is_optional_and_absent_from_a_plain_tile_message() -> None:
    """v1.1 retake loop: `replaces` names a tile; a plain tile stays byte-compatible with v1.0."""
    pixels = np.zeros((64, 96), np.uint16)
    plain = msgpack.unpackb(bytes(encode_tile(tile_header(), pixels)[0]))
    assert "replaces" not in plain
    frames = [bytes(f) for f in encode_tile(tile_header(tile_id="t.r1", seq=43, replaces="tile_000042"), pixels)]
    message = decode_stream_message(frames, LIMITS)
    assert isinstance(message, Tile) and message.header.replaces == "tile_000042"
    for bad in ("../x", 7, ""):
        with pytest.raises(ProtocolError, match="replaces"):
            decode_stream_message([raw_header(replaces=bad), PIXELS_64x96_U16], LIMITS)


@pytest.mark.parametrize("name", ["qc.jsonl", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm"])
def test_sections_named_like_the_appliances_own_files_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError, match="reserved") as info:
        decode_stream_message([raw_header(section=name), PIXELS_64x96_U16], LIMITS)
    assert info.value.code == "bad_field"


def test_v1_1_feedback_repeat_draining_and_the_new_alarm_kinds() -> None:
    error = encode_feedback("error", code="storage_failed", message="EROFS", section="s", tile_id="t", seq=1)
    repeated = decode_feedback(as_repeat(error))
    assert repeated["repeat"] is True and {k: v for k, v in repeated.items() if k != "repeat"} == decode_feedback(error)
    assert decode_feedback(encode_feedback("draining", message="stopping"))["type"] == "draining"
    kinds = {
        "disk_full": dict(directory="/out", free_bytes=0, section="s", tile_id="t", seq=1),
        "disk_ok": dict(directory="/out", waited_s=3.0, free_bytes=10),
        "restarted": dict(which="sink"),
    }
    for kind, keys in kinds.items():
        assert decode_feedback(encode_feedback("alarm", kind=kind, message="m", **keys))["kind"] == kind
    with pytest.raises(ValueError, match="needs keys"):
        encode_feedback("alarm", kind="restarted", message="m")  # `which` is required
    with pytest.raises(ValueError, match="needs keys"):
        encode_feedback("alarm", kind="restarted", message="m", which="sink", n_soft=1)  # not a key of this kind
    with pytest.raises(ProtocolError):
        decode_feedback(msgpack.packb({"v": 1, "type": "alarm", "kind": "meteor", "message": "m"}))
    assert {"storage_failed", "section_ended", "unknown_tile", "draining"} <= set(ERROR_CODES)
    assert set(ALARM_KINDS) == {"implausible_blur_share", "disk_full", "disk_ok", "restarted"}


def test_v1_1_draining_feedback_restarted_alarm_and_repeat_flag() -> None:
    draining = decode_feedback(encode_feedback("draining", message="appliance stopping"))
    assert draining == {"v": 1, "type": "draining", "message": "appliance stopping"}
    restarted = decode_feedback(encode_feedback("alarm", kind="restarted", which="sink", message="resend"))
    assert (restarted["kind"], restarted["which"]) == ("restarted", "sink")
    error = dict(code="draining", message="resend after restart", section="s", tile_id="t", seq=3)
    assert decode_feedback(encode_feedback("error", **error, repeat=True))["repeat"] is True
    with pytest.raises(ValueError, match="draining feedback needs keys"):
        encode_feedback("draining", message="x", section="s")
