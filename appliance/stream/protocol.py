"""Wire protocol v1.1 (docs/protocol.md; wire `v` 1): msgpack headers + raw pixel frames; validation, no I/O.

Nothing received is ever unpickled: headers are msgpack maps checked field by field, pixels are raw
bytes whose length must match the declared shape and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.qc_record import OUTPUT_DIR_FILES

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
SECTION_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
RESERVED_SECTION_NAMES = OUTPUT_DIR_FILES
DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}

ErrorCode = Literal[
    "bad_message",
    "unknown_version",
    "unknown_type",
    "bad_field",
    "bad_frame",
    "oversized",
    "duplicate_seq",
    "bad_pixels",
    "processing_failed",
    # v1.1: a controller written for v1.0 sees only new `code` strings, never a new key.
    "storage_failed",
    "section_ended",
    "unknown_tile",
    "draining",
]
ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)


class ProtocolError(ValueError):
    """A message broke the protocol; `code` is the wire error code, context echoes what was readable."""

    def __init__(self, code: ErrorCode, message: str, context: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.context = context or {}


class _Header(BaseModel):
    # strict: a wire "5" is not the int 5, and true is not 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1]
    section: str = Field(pattern=SECTION_NAME)

    @field_validator("section")
    @classmethod
    def _not_an_appliance_file(cls, section: str) -> str:
        # A section is a folder beside the QC record: one named like it would collide with it.
        if section in RESERVED_SECTION_NAMES:
            raise ValueError(f"{section!r} is reserved: the appliance's own file in the output directory")
        return section


class SectionStart(_Header):
    type: Literal["start"]
    expected_tiles: int = Field(0, ge=0)


class TileHeader(_Header):
    type: Literal["tile"]
    tile_id: str = Field(pattern=SAFE_NAME)
    seq: int = Field(ge=0, lt=2**63)
    shape: list[Annotated[int, Field(ge=1, le=2**20)]] = Field(min_length=2, max_length=2)
    dtype: Literal["uint8", "uint16"]
    # NaN or infinity would pass every range check and break the QC record (JSON has neither).
    pixel_size_nm: float = Field(gt=0, allow_inf_nan=False)
    stage_x_um: float = Field(allow_inf_nan=False)
    stage_y_um: float = Field(allow_inf_nan=False)
    t_acquired: float = Field(allow_inf_nan=False)
    t_sent: float = Field(allow_inf_nan=False)
    # Optional (added in v1 without a version bump: older controllers simply omit it).
    beam: int | None = Field(None, ge=0, le=65535)
    # v1.1 retake loop: the tile_id of a recorded tile of this section that this tile re-acquires.
    replaces: str | None = Field(None, pattern=SAFE_NAME)

    @property
    def frame_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * DTYPES[self.dtype].itemsize


class SectionEnd(_Header):
    type: Literal["end"]
    n_tiles: int = Field(ge=0)


@dataclass(frozen=True)
class Tile:
    """A validated tile: its header and its pixels (H, W) as a read-only view of the received frame."""

    header: TileHeader
    pixels: np.ndarray


@dataclass(frozen=True)
class StreamLimits:
    max_tile_bytes: int
    max_tile_side: int
    min_tile_side: int = 32


StreamMessage = SectionStart | Tile | SectionEnd
_HEADER_TYPES: dict[str, type[SectionStart | TileHeader | SectionEnd]] = {
    "start": SectionStart,
    "tile": TileHeader,
    "end": SectionEnd,
}


def duplicate_message(section: str, tile_id: str, seq: int) -> str:
    """The duplicate_seq error text (resend rule, docs/protocol.md)."""
    return (
        f"tile_id {tile_id!r} or seq {seq} was already used in section {section!r} by another message; "
        "a resend must repeat the identical message, a retake needs a new tile_id and seq and `replaces`"
    )


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_map(frame: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode one msgpack map with string keys; raise ProtocolError(bad_message) otherwise."""
    if len(frame) > max_bytes:
        raise ProtocolError("bad_message", f"header frame is {len(frame)} bytes; the limit is {max_bytes}")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=4096,
            max_map_len=256,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError, ...
        raise ProtocolError("bad_message", f"header frame is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"header must be a msgpack map, got {type(obj).__name__}")
    return obj


def _echo(raw: dict[str, Any]) -> dict[str, Any]:
    """The identifying fields of a bad message, kept only when they are plain values."""
    echoed: dict[str, Any] = {}
    for key in ("section", "tile_id"):
        if isinstance(raw.get(key), str) and len(raw[key]) <= 128:
            echoed[key] = raw[key]
    if isinstance(raw.get("seq"), int) and not isinstance(raw.get("seq"), bool):
        echoed["seq"] = raw["seq"]
    return echoed


def decode_stream_message(frames: Sequence[bytes | memoryview], limits: StreamLimits) -> StreamMessage:
    """Validate one multipart message from the controller; raise ProtocolError with a wire code."""
    if not frames:
        raise ProtocolError("bad_message", "empty multipart message")
    raw = unpack_map(frames[0])
    context = _echo(raw)
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "unknown_version",
            f"protocol version {raw.get('v')!r} is not supported; send v={PROTOCOL_VERSION}",
            context,
        )
    kind = raw.get("type")
    header_type = _HEADER_TYPES.get(kind) if isinstance(kind, str) else None
    if header_type is None:
        raise ProtocolError("unknown_type", f"message type {kind!r} is not one of start, tile, end", context)
    expected_frames = 2 if kind == "tile" else 1
    if len(frames) != expected_frames:
        raise ProtocolError(
            "bad_message", f"a {kind} message has {expected_frames} frame(s), got {len(frames)}", context
        )
    try:
        header = header_type.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'header'}: {err['msg']}" for err in exc.errors()
        )
        raise ProtocolError("bad_field", f"invalid {kind} header: {problems}", context) from None
    if not isinstance(header, TileHeader):
        return header
    return Tile(header=header, pixels=_decode_pixels(header, frames[1], limits, context))


def _decode_pixels(
    header: TileHeader, frame: bytes | memoryview, limits: StreamLimits, context: dict[str, Any]
) -> np.ndarray:
    height, width = header.shape
    if max(height, width) > limits.max_tile_side:
        raise ProtocolError(
            "oversized", f"tile shape {height}x{width} exceeds the {limits.max_tile_side} px side limit", context
        )
    if min(height, width) < limits.min_tile_side:
        raise ProtocolError(
            "bad_field",
            f"tile shape {height}x{width} is below the {limits.min_tile_side} px side minimum",
            context,
        )
    if len(frame) > limits.max_tile_bytes:
        raise ProtocolError(
            "oversized", f"pixel frame is {len(frame)} bytes; the limit is {limits.max_tile_bytes}", context
        )
    if len(frame) != header.frame_bytes:
        raise ProtocolError(
            "bad_frame",
            f"pixel frame is {len(frame)} bytes but shape {height}x{width} {header.dtype} needs "
            f"{header.frame_bytes} (truncated or wrong shape/dtype)",
            context,
        )
    return np.frombuffer(frame, dtype=DTYPES[header.dtype]).reshape(height, width)


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_start(section: str, expected_tiles: int = 0) -> list[bytes]:
    """Frames of a `start` message."""
    return [_pack({"v": PROTOCOL_VERSION, "type": "start", "section": section, "expected_tiles": expected_tiles})]


def encode_end(section: str, n_tiles: int) -> list[bytes]:
    """Frames of an `end` message."""
    return [_pack({"v": PROTOCOL_VERSION, "type": "end", "section": section, "n_tiles": n_tiles})]


def encode_tile(header: TileHeader, pixels: np.ndarray) -> list[bytes | memoryview]:
    """Frames of a `tile` message; pixels are sent without a copy when already C-contiguous."""
    expected = DTYPES[header.dtype]
    if pixels.shape != tuple(header.shape) or pixels.dtype.newbyteorder("<") != expected:
        raise ValueError(f"pixels {pixels.shape} {pixels.dtype} do not match header {header.shape} {header.dtype}")
    pixels = np.ascontiguousarray(pixels, dtype=expected)
    # `replaces` only when set, so that a plain tile is byte-for-byte a v1.0 message.
    fields = header.model_dump(exclude=None if header.replaces else {"replaces"})
    return [_pack(fields), pixels.data.cast("B")]


# ---- feedback (appliance -> controller) ----

FeedbackType = Literal["result", "retake", "error", "section_done", "alarm", "draining"]
AlarmKind = Literal["implausible_blur_share", "disk_full", "disk_ok", "restarted"]
ALARM_KINDS: tuple[AlarmKind, ...] = get_args(AlarmKind)
ALARM_RESTARTED: AlarmKind = "restarted"  # key `which`: "ingest" | "sink"; resend every unanswered tile now
_IDS = frozenset({"section", "tile_id", "seq"})
_FEEDBACK_KEYS: dict[str, frozenset[str]] = {
    "result": _IDS | {"label", "action", "blur_score", "sigma_px", "path", "latency_s"},
    "retake": _IDS | {"reason", "blur_score"},
    "error": _IDS | {"code", "message"},
    "section_done": frozenset(
        {
            "section",
            "n_done",
            "n_sharp",
            "n_soft",
            "n_retake",
            "n_empty",
            "n_error",
            "n_expected",
            "n_rejected",
            "n_repeat",
        }
    ),
    "alarm": frozenset({"kind", "message"}),
    "draining": frozenset({"message"}),
}
# Keys a feedback type carries only in some messages (docs/protocol.md says when). `repeat`: the
# recorded answer of a tile (or section) re-sent because the controller sent it again (resend rule).
_FEEDBACK_OPTIONAL_KEYS: dict[str, frozenset[str]] = {
    "result": frozenset({"restore_suspended", "repeat", "replaces"}),
    "retake": frozenset({"repeat"}),
    "error": frozenset({"repeat"}),
    "section_done": frozenset({"repeat"}),
}
# A beam's running in-focus baseline left its reference or came back (appliance.detection.online_baseline).
_FOCUS_ALARM_KEYS = frozenset(
    {"beam", "baseline_sigma_px", "reference_sigma_px", "drift_log", "threshold", "pixel_size_nm", "calibrated"}
)
# alarm: `kind` and `message` always; the rest depends on the kind.
_ALARM_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "implausible_blur_share": (
        _IDS | {"n_judged", "n_soft", "n_retake", "share", "threshold", "min_tiles", "calibrated"},
        frozenset(),
    ),
    "disk_full": (frozenset({"directory"}), _IDS | {"free_bytes"}),
    "disk_ok": (frozenset({"directory"}), frozenset({"waited_s", "free_bytes"})),
    "restarted": (frozenset({"which"}), frozenset()),
    "focus_drift": (_FOCUS_ALARM_KEYS, _IDS),
    "focus_ok": (_FOCUS_ALARM_KEYS, _IDS),
}


def _feedback_keys_ok(kind: str, keys: set[str], alarm_kind: object = None) -> bool:
    required = _FEEDBACK_KEYS[kind]
    optional = _FEEDBACK_OPTIONAL_KEYS.get(kind, frozenset())
    if kind == "alarm":
        if not isinstance(alarm_kind, str) or alarm_kind not in _ALARM_KEYS:
            return False
        extra_required, extra_optional = _ALARM_KEYS[alarm_kind]
        required, optional = required | extra_required, optional | extra_optional
    return required <= keys <= required | optional


def encode_feedback(feedback_type: FeedbackType, /, **fields: Any) -> bytes:
    """One feedback frame; the keys must be those of `feedback_type` (and alarm `kind`) in docs/protocol.md."""
    if not _feedback_keys_ok(feedback_type, set(fields), fields.get("kind")):
        expected = sorted(_FEEDBACK_KEYS[feedback_type])
        raise ValueError(f"{feedback_type} feedback needs keys {expected} (see docs/protocol.md), got {sorted(fields)}")
    return _pack({"v": PROTOCOL_VERSION, "type": feedback_type, **fields})


def as_repeat(frame: bytes) -> bytes:
    """A recorded feedback frame re-sent under the resend rule: the same map plus `repeat: true`."""
    message = unpack_map(frame)
    message["repeat"] = True
    return _pack(message)


def decode_feedback(frame: bytes | memoryview) -> dict[str, Any]:
    """Validate one feedback frame (controller side); raise ProtocolError on anything unexpected."""
    raw = unpack_map(frame)
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("unknown_version", f"feedback version {raw.get('v')!r} is not {PROTOCOL_VERSION}")
    kind = raw.get("type")
    if kind not in _FEEDBACK_KEYS:
        raise ProtocolError("unknown_type", f"feedback type {kind!r} is unknown")
    keys = set(raw) - {"v", "type"}
    if not _feedback_keys_ok(kind, keys, raw.get("kind")):
        raise ProtocolError("bad_field", f"{kind} feedback has keys {sorted(keys)}")
    return raw
