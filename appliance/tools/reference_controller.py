"""Reference controller: streams tiles to an appliance over ZeroMQ and collects its feedback.

Used by `python -m appliance demo`, `bench/replay.py` and the tests; a controller vendor can read it
next to docs/protocol.md. It follows protocol v1.1: answers are matched by (section, tile_id) in
completion order; `repeat: true` answers of tiles already answered are counted, not double-counted;
tiles without an answer are resent identically after `reply_timeout_s` or at once after an
`alarm` `restarted`; flagged tiles are re-acquired and sent with `replaces` (the retake loop).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from appliance.serving.pipeline import Appliance, RunningEndpoints
from appliance.stream.protocol import ProtocolError, TileHeader, decode_feedback, encode_end, encode_start, encode_tile
from appliance.stream.zmq_security import (
    CurveKeys,
    keep_feedback_connection_alive,
    load_key_pair,
    secure_client_socket,
)

MULTISEM_TILES_PER_S = 25.4
REPLY_TIMEOUT_S = 120.0  # docs/protocol.md: resend a tile still unanswered after this long
# Errors after which the tile is still owed an answer: resend it (later, or after the restart).
RESEND_CODES = frozenset({"storage_failed", "draining"})


@dataclass
class ReplayReport:
    """What the controller saw: every tile sent must come back exactly once as a result or an error."""

    sent: int = 0
    bytes_sent: int = 0
    wall_s: float = 0.0
    send_blocked_s: float = 0.0
    results: Counter[str] = field(default_factory=Counter)  # by label
    actions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # by code
    retake_flags: int = 0
    latencies_s: list[float] = field(default_factory=list)
    duplicated: int = 0
    lost: int = 0
    section_done: dict[str, Any] | None = None
    bad_feedback: int = 0
    repeats: int = 0  # answers marked `repeat: true` (resend rule); never counted twice
    resent: int = 0  # tiles this controller sent again (no answer within the reply timeout, or restarted)

    @property
    def done(self) -> int:
        return sum(self.results.values())

    @property
    def tiles_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def latency_percentile_s(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    @classmethod
    def combined(cls, reports: Iterable[ReplayReport]) -> ReplayReport:
        """Several controllers streaming at once as one: counts and latencies added, the longest wall time."""
        total = cls()
        for report in reports:
            total.sent += report.sent
            total.bytes_sent += report.bytes_sent
            total.wall_s = max(total.wall_s, report.wall_s)
            total.send_blocked_s += report.send_blocked_s
            total.results += report.results
            total.actions += report.actions
            total.errors += report.errors
            total.retake_flags += report.retake_flags
            total.latencies_s += report.latencies_s
            total.duplicated += report.duplicated
            total.lost += report.lost
            total.bad_feedback += report.bad_feedback
            total.repeats += report.repeats
            total.resent += report.resent
        return total

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "done": self.done,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "results_by_label": dict(self.results),
            "actions": dict(self.actions),
            "errors_by_code": dict(self.errors),
            "retake_flags": self.retake_flags,
            "wall_s": round(self.wall_s, 3),
            "tiles_per_s": round(self.tiles_per_s, 2),
            "mb_per_s": round(self.mb_per_s, 2),
            "send_blocked_s": round(self.send_blocked_s, 3),
            "latency_p50_s": self.latency_percentile_s(50),
            "latency_p95_s": self.latency_percentile_s(95),
            "latency_p99_s": self.latency_percentile_s(99),
            "section_done": self.section_done,
            "bad_feedback": self.bad_feedback,
            "repeats": self.repeats,
            "resent": self.resent,
        }


TileSource = Iterable[tuple[str, np.ndarray]]


GRID_OVERLAP = 0.1  # neighbouring tiles share 10 % of their side, as in a stitched montage


def grid_stage_um(seq: int, shape: tuple[int, ...], pixel_size_nm: float, columns: int) -> tuple[float, float]:
    """Stand-in stage position (x, y) in µm of tile `seq` in a row-major montage `columns` tiles wide."""
    height_um, width_um = (side * pixel_size_nm / 1000.0 for side in shape[:2])
    step = 1.0 - GRID_OVERLAP
    return (seq % columns) * width_um * step, (seq // columns) * height_um * step


def tile_frames(
    section: str,
    tile_id: str,
    seq: int,
    pixels: np.ndarray,
    pixel_size_nm: float = 4.0,
    columns: int = 100,
    beam: int | None = None,
    replaces: str | None = None,
) -> list[bytes | memoryview]:
    """Frames of one `tile` message, stamped now; the stage position is a stand-in grid from `seq`.

    replaces: the tile_id of a flagged tile this one re-acquires (retake loop).
    """
    now = time.time()
    stage_x_um, stage_y_um = grid_stage_um(seq, pixels.shape, pixel_size_nm, columns)
    header = TileHeader(
        v=1,
        type="tile",
        section=section,
        tile_id=tile_id,
        seq=seq,
        shape=list(pixels.shape),
        dtype=str(pixels.dtype),  # type: ignore[arg-type]  # a str; TileHeader validates it is uint8/uint16
        pixel_size_nm=pixel_size_nm,
        stage_x_um=stage_x_um,
        stage_y_um=stage_y_um,
        t_acquired=now,
        t_sent=now,
        beam=beam,
        replaces=replaces,
    )
    return encode_tile(header, pixels)


def is_final_answer(message: dict[str, Any]) -> bool:
    """A `result`, or an `error` after which the tile is not resent (all codes but storage_failed, draining)."""
    return message["type"] == "result" or (message["type"] == "error" and message.get("code") not in RESEND_CODES)


@dataclass(frozen=True)
class ControllerCurve:
    """The controller's side of CURVE: its own key pair and the rig's pinned public key (docs/security.md)."""

    client: CurveKeys
    server_public_key: bytes

    @classmethod
    def from_files(cls, client_secret_file: Path, server_public_file: Path) -> ControllerCurve:
        """From `keys generate` files: the controller's NAME.key_secret and the rig's server.key."""
        return cls(load_key_pair(client_secret_file), load_key_pair(server_public_file).public)

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client of the rig; before `connect`."""
        secure_client_socket(socket, self.client, self.server_public_key)


class ReferenceController:
    """PUSH tiles to `tile_endpoint`, PULL feedback from `feedback_endpoint` (docs/protocol.md).

    Keeps every tile message it sent until the tile's final answer arrives, so it can resend it
    identically (resend rule); a vendor's controller must keep them the same way.
    curve: the controller's CURVE keys when the rig has `security.curve` on; None connects without.
    """

    def __init__(
        self,
        tile_endpoint: str,
        feedback_endpoint: str,
        send_hwm: int = 2,
        curve: ControllerCurve | None = None,
        send_buffer_bytes: int = 0,
    ) -> None:
        self._context = zmq.Context()
        self._curve = curve
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, send_hwm)
        if send_buffer_bytes:  # the kernel's TCP send buffer (ZeroMQ SNDBUF); 0: the OS's own
            self._push.setsockopt(zmq.SNDBUF, send_buffer_bytes)
        self._push.setsockopt(zmq.LINGER, 5000)
        if curve is not None:
            curve.apply(self._push)
        self._push.connect(tile_endpoint)
        self._feedback_endpoint = feedback_endpoint
        self._lock = threading.Lock()
        self._feedback: list[tuple[float, dict[str, Any]]] = []
        self._bad_feedback = 0
        # (section, tile_id) -> frames of tiles sent and not finally answered yet, in send order.
        self._unanswered: dict[tuple[str, str], list[Any]] = {}
        self._ended: dict[str, int] = {}  # sections whose `end` was sent -> n_tiles
        self._next_seq: dict[str, int] = {}
        self._sent_at: dict[tuple[str, str], float] = {}  # first send of each tile (perf_counter s)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._receiver = threading.Thread(target=self._receive_feedback, name="feedback", daemon=True)
        self._receiver.start()
        self._ready.wait(5)

    def send_raw(self, frames: list[bytes | memoryview]) -> None:
        """Send any multipart message as is (tests use it for malformed input)."""
        self._push.send_multipart(frames, copy=False)

    def send_tile(
        self, section: str, tile_id: str, pixels: np.ndarray, report: ReplayReport | None = None, **header: Any
    ) -> int:
        """Send one tile under the section's next seq (kept for resending until answered); returns the seq.

        header: tile_frames' optional fields (pixel_size_nm, columns, beam, replaces).
        """
        seq = self._next_seq.get(section, 0)
        self._next_seq[section] = seq + 1
        frames = tile_frames(section, tile_id, seq, pixels, **header)
        with self._lock:
            self._unanswered[(section, tile_id)] = frames
            self._sent_at.setdefault((section, tile_id), time.perf_counter())
        self._send(frames, report or ReplayReport())
        if report is not None:
            report.sent += 1
            report.bytes_sent += pixels.nbytes
        return seq

    def send_section(
        self,
        section: str,
        tiles: TileSource,
        rate_hz: float | None = MULTISEM_TILES_PER_S,
        timeout_s: float = 120.0,
        on_progress: Callable[[int, int], None] | None = None,
        pixel_size_nm: float = 4.0,
        expected_tiles: int = 0,
        columns: int = 100,
        beams: int = 0,
        reply_timeout_s: float | None = None,
    ) -> ReplayReport:
        """Stream one section (start, tiles, end) at `rate_hz` (None = flat out) and wait for it.

        Returns when `section_done` arrives or `timeout_s` after the last send; tiles with no result
        by then count as lost. on_progress(sent, done) is called as tiles go out and come back, and
        once more at the end with the final counts. Tiles lie on a montage `columns` wide; with
        `beams` > 0 tile `seq` carries beam `seq % beams`. reply_timeout_s: resend the unanswered
        tiles (and `end`) when no answer came for that long (None: never; the protocol's default is
        REPLY_TIMEOUT_S); an `alarm` `restarted` resends them at once.
        """
        report = ReplayReport()
        self._send(encode_start(section, expected_tiles), report)
        t_start = time.perf_counter()
        n_feedback_at_start = len(self.feedback())
        for index, (tile_id, pixels) in enumerate(tiles):
            if rate_hz:
                delay = t_start + index / rate_hz - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            beam = self._next_seq.get(section, 0) % beams if beams else None
            self.send_tile(section, tile_id, pixels, report, pixel_size_nm=pixel_size_nm, columns=columns, beam=beam)
            if on_progress:
                on_progress(report.sent, self._count_done(section))
        self._send(encode_end(section, report.sent), report)
        self._ended[section] = report.sent
        self._wait_for_section(section, timeout_s, reply_timeout_s, report, on_progress, n_feedback_at_start)
        if on_progress:  # the last results may arrive together with section_done, after the last poll
            on_progress(report.sent, self._count_done(section))
        report.wall_s = time.perf_counter() - t_start
        self._tally(section, report)
        return report

    def unanswered(self, section: str) -> list[str]:
        """tile_ids of `section` sent and not finally answered yet (storage_failed/draining are not final)."""
        with self._lock:
            return [tile_id for sec, tile_id in self._unanswered if sec == section]

    def resend_unanswered(self, section: str, report: ReplayReport | None = None) -> int:
        """Resend every unanswered tile of `section` identically (and its `end` if it has no section_done).

        Safe by the resend rule: a tile the appliance already recorded is answered again with
        `repeat: true`, never written twice. Returns how many tiles were resent.
        """
        with self._lock:
            frames = [f for (sec, _), f in self._unanswered.items() if sec == section]
        report = report or ReplayReport()
        for tile_frames_ in frames:
            self._send(tile_frames_, report)
        report.resent += len(frames)
        if section in self._ended and not self._section_done(section):
            self._send(encode_end(section, self._ended[section]), report)
        return len(frames)

    def retake_flagged(
        self, section: str, acquire: Callable[[str], np.ndarray], timeout_s: float = 120.0, pixel_size_nm: float = 4.0
    ) -> ReplayReport:
        """The retake loop: re-acquire each tile flagged `retake` in `section` and send it with `replaces`.

        acquire(tile_id) returns the new pixels of that tile (the microscope re-images it). The retake
        gets a new tile_id (`<tile_id>.r<n>`) and the section's next seq; the appliance delivers it at
        the flagged tile's path. Returns when every retake is answered or after `timeout_s`.
        """
        report = ReplayReport()
        flagged = sorted({m["tile_id"] for m in self.feedback() if m["type"] == "retake" and m["section"] == section})
        replaced = {m.get("replaces") for m in self.feedback() if m["type"] == "result" and m["section"] == section}
        t_start = time.perf_counter()
        retake_ids = []
        for tile_id in flagged:
            if tile_id in replaced:  # this flag was already answered by a retake
                continue
            retake_id = f"{tile_id}.r{self._next_seq.get(section, 0)}"
            self.send_tile(section, retake_id, acquire(tile_id), report, pixel_size_nm=pixel_size_nm, replaces=tile_id)
            retake_ids.append(retake_id)
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline and any(t in self.unanswered(section) for t in retake_ids):
            time.sleep(0.05)
        report.wall_s = time.perf_counter() - t_start
        self._tally(section, report, only=set(retake_ids))
        return report

    def feedback(self) -> list[dict[str, Any]]:
        """Every feedback message received so far, in arrival order."""
        with self._lock:
            return [message for _, message in self._feedback]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.feedback()):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._receiver.join(timeout=5)
        self._push.close()
        self._context.term()

    def __enter__(self) -> ReferenceController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, frames: list[Any], report: ReplayReport) -> None:
        # A blocked send is the appliance's backpressure: measure it, never drop.
        t0 = time.perf_counter()
        self._push.send_multipart(frames, copy=False)
        report.send_blocked_s += time.perf_counter() - t0

    def _wait_for_section(
        self,
        section: str,
        timeout_s: float,
        reply_timeout_s: float | None,
        report: ReplayReport,
        on_progress: Callable[[int, int], None] | None,
        n_seen: int,
    ) -> None:
        deadline = time.perf_counter() + timeout_s
        last_answer = time.perf_counter()
        while time.perf_counter() < deadline and not self._section_done(section):
            if on_progress:
                on_progress(report.sent, self._count_done(section))
            feedback = self.feedback()
            if len(feedback) > n_seen:
                last_answer = time.perf_counter()
            restarted = any(m["type"] == "alarm" and m["kind"] == "restarted" for m in feedback[n_seen:])
            n_seen = len(feedback)
            silent = reply_timeout_s is not None and time.perf_counter() - last_answer > reply_timeout_s
            if restarted or silent:
                self.resend_unanswered(section, report)
                last_answer = time.perf_counter()
            time.sleep(0.05)

    def _receive_feedback(self) -> None:
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        keep_feedback_connection_alive(pull)  # docs/protocol.md: a pause in reading must not drop the connection
        if self._curve is not None:
            self._curve.apply(pull)
        pull.connect(self._feedback_endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not pull.poll(50):
                    continue
                frame = pull.recv()
                try:
                    message = decode_feedback(frame)
                except ProtocolError:
                    with self._lock:
                        self._bad_feedback += 1
                    continue
                with self._lock:
                    self._feedback.append((time.perf_counter(), message))
                    if message["type"] in ("result", "error") and is_final_answer(message):
                        self._unanswered.pop((message.get("section"), message.get("tile_id")), None)  # type: ignore[arg-type]
        finally:
            pull.close()

    def _count_done(self, section: str) -> int:
        with self._lock:
            return len(
                {m["tile_id"] for _, m in self._feedback if m.get("section") == section and m["type"] == "result"}
            )

    def _section_done(self, section: str) -> bool:
        with self._lock:
            return any(m["type"] == "section_done" and m["section"] == section for _, m in self._feedback)

    def _tally(self, section: str, report: ReplayReport, only: set[str] | None = None) -> None:
        """Fill `report` from the feedback of `section` (only the tiles in `only` when given)."""
        answered: Counter[str] = Counter()
        flagged: set[str] = set()
        with self._lock:
            messages = [(t, m) for t, m in self._feedback if m.get("section") == section]
            sent_at = {tile_id: t for (sec, tile_id), t in self._sent_at.items() if sec == section}
            report.bad_feedback = self._bad_feedback
            report.lost = sum(
                1 for sec, tile_id in self._unanswered if sec == section and tile_id in (only or {tile_id})
            )
        for t_arrived, message in messages:
            kind, tile_id = message["type"], message.get("tile_id")
            if kind == "section_done" and only is None:
                report.section_done = message
                continue
            if only is not None and tile_id not in only:
                continue
            already = tile_id in answered if kind != "retake" else tile_id in flagged
            if message.get("repeat"):
                report.repeats += kind != "retake"
                if already:
                    continue
            if kind == "retake":
                flagged.add(str(tile_id))
                report.retake_flags += 1
            elif kind in ("result", "error"):
                if kind == "error":
                    report.errors[message["code"]] += 1
                if not is_final_answer(message) or not isinstance(tile_id, str):
                    continue
                answered[tile_id] += 1
                if kind == "result":
                    report.results[message["label"]] += 1
                    report.actions[message["action"]] += 1
                    report.latencies_s.append(t_arrived - sent_at.get(tile_id, t_arrived))
        report.duplicated = sum(count - 1 for count in answered.values() if count > 1)


def cycle_tiles(tiles: list[tuple[str, np.ndarray]], count: int) -> Iterator[tuple[str, np.ndarray]]:
    """`count` tiles from `tiles` in turn, each with a unique tile id."""
    for index, (name, pixels) in enumerate(itertools.islice(itertools.cycle(tiles), count)):
        yield f"{index:06d}_{name}", pixels


def run_replay(
    appliance: Appliance,
    tiles: Iterator[tuple[str, np.ndarray]],
    count: int,
    rate_hz: float | None,
    section: str,
    beams: int = 0,
) -> ReplayReport:
    """Stream `count` tiles to a started appliance with a progress bar; return what came back.

    Tiles lie on a square montage; with `beams` > 0 they carry beam numbers in turn.
    """
    assert appliance.endpoints is not None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        ReferenceController(appliance.endpoints.tile, appliance.endpoints.feedback) as client,
        Progress(*columns) as progress,
    ):
        sent_bar = progress.add_task("sent", total=count)
        done_bar = progress.add_task("done", total=count)

        def on_progress(sent: int, done: int) -> None:
            progress.update(sent_bar, completed=sent)
            progress.update(done_bar, completed=done)

        return client.send_section(
            section,
            tiles,
            rate_hz=rate_hz,
            on_progress=on_progress,
            expected_tiles=count,
            columns=math.ceil(math.sqrt(count)),
            beams=beams,
        )


def run_replays(
    microscopes: Mapping[str, RunningEndpoints],
    tiles: Callable[[], Iterator[tuple[str, np.ndarray]]],
    count: int,
    rate_hz: float | None,
    section: str,
) -> dict[str, ReplayReport]:
    """Several microscopes streamed at once (e.g. a started appliance's `microscopes`), `count` tiles each
    at `rate_hz` (None: flat out), one controller per microscope in its own thread; each one's report.

    tiles: makes a fresh tile iterator for each controller; section: each microscope's is `section-NAME`.
    """
    reports: dict[str, ReplayReport] = {}
    failures: list[BaseException] = []

    def stream(name: str, endpoints: RunningEndpoints) -> None:
        try:
            with ReferenceController(endpoints.tile, endpoints.feedback) as client:
                reports[name] = client.send_section(
                    f"{section}-{name}",
                    tiles(),
                    rate_hz=rate_hz,
                    expected_tiles=count,
                    columns=math.ceil(math.sqrt(count)),
                )
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)

    threads = [
        threading.Thread(target=stream, args=(name, endpoints), name=f"replay-{name}")
        for name, endpoints in microscopes.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return reports
