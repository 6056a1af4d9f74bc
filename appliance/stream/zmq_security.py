"""Who may talk to the appliance's two ZeroMQ sockets: CURVE keys, one feedback peer, a frame-size cap.

Every server socket of the appliance goes through `secure_server_socket` before it binds, so the rules
live here and the socket owners (ingest, sink) make one call each:
- CURVE (rig.yaml `security.curve`): the socket is a CURVE server with the rig's secret key, and a ZAP
  handler admits only the pinned controller public keys (`security.controller_public_keys`).
- One feedback peer: the feedback PUSH socket admits one connected peer at a time. A PUSH socket deals
  its messages round-robin to every connected PULL, so a second reader would take half of the replies.
  With CURVE only a pinned key gets in at all; without CURVE (loopback only, or an explicit
  `allow_unauthenticated_network`) the first peer keeps the socket until it disconnects.
- MAXMSGSIZE on the tile socket: libzmq drops a connection that announces a larger frame before it
  buffers it, so a 2 GiB frame never reaches the ingest's memory. Frames up to twice the tile limit
  still get through and are refused politely (`error` oversized): the usual cause is a controller
  sending 16-bit tiles against a limit sized for 8-bit ones, and it must learn why, not reconnect and
  resend forever.

The controller side (`secure_client_socket`; `keep_feedback_connection_alive` on its feedback PULL, so that a
pause in reading is not taken for a dead peer) is used by the reference controller, the fault drills and tests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
import zmq.utils.monitor
import zmq.utils.z85

from appliance.config import ConfigError, SecurityConfig

log = logging.getLogger(__name__)

Role = Literal["tiles", "feedback"]
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# Room for the msgpack header frame next to the pixel frame (headers are ~300 bytes; libzmq checks
# every frame against MAXMSGSIZE, the largest being the pixels).
HEADER_ALLOWANCE_BYTES = 64 * 1024
# Frames up to this many times ingest.max_tile_bytes are read and answered `oversized`; larger ones are
# dropped by libzmq unread. The ingest then buffers at most RCVHWM x this x the limit.
POLITE_REFUSAL_FACTOR = 2
# A feedback peer that vanished without a FIN (cable pulled) is noticed within this, so the controller's
# next connection is admitted instead of waiting for TCP to give up.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
# A controller's feedback PULL pings the appliance (keep_feedback_connection_alive).
CONTROLLER_HEARTBEAT_IVL_MS = 1000
CONTROLLER_HEARTBEAT_TIMEOUT_MS = 600_000
# A connection that never completes the ZeroMQ handshake is closed after this (it counts as a peer
# until then).
HANDSHAKE_IVL_MS = 10_000
# A second feedback connection waits this long for the first to go before it is refused: longer than
# HEARTBEAT_TIMEOUT_MS, so a controller reconnecting after a silent network cut gets in once its dead
# connection times out. libzmq (4.3) never retries a refused connection, so refusing at once would
# lock the controller out.
SECOND_PEER_WAIT_S = 4.0
_POLL_MS = 200
_MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


@dataclass(frozen=True)
class CurveKeys:
    """A z85 CURVE key pair (40 characters each); `secret` is None for a public-only certificate."""

    public: bytes
    secret: bytes | None


def load_key_pair(path: Path) -> CurveKeys:
    """Read a ZeroMQ certificate (`python -m appliance keys generate`, or CZMQ's zcert format).

    Raises ValueError naming the file when it cannot be read or holds no public key.
    """
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable ZeroMQ certificate ({exc})") from exc
    if not public:
        raise ValueError(f"{path}: no public-key in this certificate")
    return CurveKeys(public=public, secret=secret)


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Make a new CURVE key pair as `NAME.key` (public, 0644) and `NAME.key_secret` (both keys, 0600).

    The files use ZeroMQ's certificate format, which pyzmq, CZMQ and JeroMQ read. Refuses to overwrite
    an existing pair (a rig's pinned keys must not change by accident). Returns (public, secret) paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: remove it first or choose another --name")
    public, secret = zmq.curve_keypair()
    _write_certificate(public_path, public, None, 0o644)
    _write_certificate(secret_path, public, secret, 0o600)
    return public_path, secret_path


def _write_certificate(path: Path, public: bytes, secret: bytes | None, mode: int) -> None:
    lines = ["#   ZeroMQ CURVE certificate (python -m appliance keys generate)", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode("ascii")}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    # O_EXCL with the final mode: the secret is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, mode)  # the umask may have removed bits of 0644


def secure_server_socket(
    socket: zmq.Socket, security: SecurityConfig, role: Role, max_frame_bytes: int | None = None
) -> None:
    """Apply the rig's access rules to one appliance server socket; call it before `bind`.

    role: "tiles" (PULL, any number of pinned senders) or "feedback" (PUSH, one peer at a time).
    max_frame_bytes: the largest pixel frame accepted (ingest.max_tile_bytes); the socket's MAXMSGSIZE
    is `max_message_bytes(max_frame_bytes)`.
    """
    if max_frame_bytes is not None:
        socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(max_frame_bytes))
    if security.curve:
        keys = load_server_keys(security)
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret or b"")
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    if role == "feedback":
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    if security.curve or role == "feedback":
        # A ZAP domain makes libzmq ask the handler about every connection, NULL mechanism included.
        socket.setsockopt(zmq.ZAP_DOMAIN, role.encode())
        _zap_handler_for(socket.context).guard(socket, role, security)


def max_message_bytes(max_frame_bytes: int) -> int:
    """The tile socket's ZMQ_MAXMSGSIZE (bytes) for a pixel-frame limit of `max_frame_bytes`."""
    return POLITE_REFUSAL_FACTOR * max_frame_bytes + HEADER_ALLOWANCE_BYTES


def load_server_keys(security: SecurityConfig) -> CurveKeys:
    """The rig's CURVE key pair from `security.server_secret_key_file` (checked at start-up)."""
    if security.server_secret_key_file is None:  # the config validator already refuses this
        raise ValueError("security.curve is true but security.server_secret_key_file is not set")
    keys = load_key_pair(security.server_secret_key_file)
    if not keys.secret:
        raise ValueError(
            f"security.server_secret_key_file {security.server_secret_key_file}: holds no secret-key "
            "(that is the public .key file; use the .key_secret file)"
        )
    return keys


def check_curve_keys(security: SecurityConfig) -> None:
    """Raise ConfigError naming the field when CURVE is on and the rig's key file cannot be used."""
    if security.curve:
        try:
            keys = load_server_keys(security)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        log.info("CURVE on: the rig's public key is %s", keys.public.decode("ascii"))


def keep_feedback_connection_alive(socket: zmq.Socket) -> None:
    """Ping the appliance from a controller's feedback PULL every second; call it before `connect`.

    The appliance drops a feedback connection after HEARTBEAT_TIMEOUT_MS without traffic back, and the
    frames still on it are lost. A PULL whose queue is full reads nothing from the connection, the
    appliance's PINGs included, so a controller that stops reading for ~7 s would look dead. Its own PINGs
    go out from libzmq's I/O thread whatever the application does, and count as traffic.
    """
    socket.setsockopt(zmq.HEARTBEAT_IVL, CONTROLLER_HEARTBEAT_IVL_MS)
    # Its PINGs' answers wait unread behind the frames it is not reading: time out only on a long silence.
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, CONTROLLER_HEARTBEAT_TIMEOUT_MS)


def secure_client_socket(socket: zmq.Socket, client: CurveKeys, server_public_key: bytes) -> None:
    """Make a controller socket a CURVE client of the appliance; call it before `connect`."""
    if not client.secret:
        raise ValueError("the controller's CURVE certificate holds no secret-key (use its .key_secret file)")
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_public_key)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, client.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, client.secret)


class _Guarded:
    """What the ZAP handler knows about one guarded socket: its rules and its open connections."""

    def __init__(self, role: Role, security: SecurityConfig) -> None:
        self.role = role
        self.curve = security.curve
        self.allowed_keys = frozenset(key.encode("ascii") for key in security.controller_public_keys)
        self.monitor: zmq.Socket | None = None
        self.open_fds: set[int] = set()


class ZapHandler:
    """The ZAP handler of one ZeroMQ context, in a thread of its own (zmq RFC 27).

    It runs on a shadow of the guarded sockets' context (the ingest's asyncio context included) and ends
    when that context is terminated, so closing the sockets and terminating the context as before is all
    an owner does.
    """

    def __init__(self, context: zmq.Context) -> None:
        self._context: zmq.Context = zmq.Context.shadow(context.underlying)
        # ROUTER, not REP: a feedback request may wait for the peer before it to go, others go on.
        self._zap = self._context.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._zap, zmq.POLLIN)
        self._domains: dict[bytes, _Guarded] = {}  # only the handler thread touches it
        self._lock = threading.Lock()
        self._pending: list[tuple[bytes, _Guarded, str | None]] = []
        self._waiting: list[tuple[float, list[bytes]]] = []  # (deadline, request) of second feedback peers
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name="zap-handler", daemon=True)
        self._thread.start()

    def guard(self, socket: zmq.Socket, role: Role, security: SecurityConfig) -> None:
        """Start admitting connections to `socket` by the rules of `role` (one socket per role)."""
        monitor_endpoint = None
        if role == "feedback":
            monitor_endpoint = f"inproc://appliance-zap-monitor-{id(socket):x}"
            socket.monitor(monitor_endpoint, _MONITOR_EVENTS)
        with self._lock:
            self._pending.append((role.encode(), _Guarded(role, security), monitor_endpoint))

    def _run(self) -> None:
        try:
            while True:
                self._attach_pending()
                events = dict(self._poller.poll(_POLL_MS))
                self._read_monitors()
                if self._zap in events:
                    self._waiting.append((time.monotonic() + SECOND_PEER_WAIT_S, self._zap.recv_multipart()))
                self._answer_waiting()
        except zmq.ContextTerminated:
            pass
        finally:
            self.stopped = True
            for guarded in self._domains.values():
                if guarded.monitor is not None:
                    guarded.monitor.close(linger=0)
            self._zap.close(linger=0)

    def _attach_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for domain, guarded, endpoint in pending:
            if endpoint is not None:
                guarded.monitor = self._context.socket(zmq.PAIR)
                guarded.monitor.setsockopt(zmq.LINGER, 0)
                guarded.monitor.connect(endpoint)
                self._poller.register(guarded.monitor, zmq.POLLIN)
            self._domains[domain] = guarded

    def _read_monitors(self) -> None:
        # Drained before every decision: a connection's ACCEPTED event is queued before its handshake
        # reaches the ZAP request, and its DISCONNECTED event frees the feedback socket for the next peer.
        for guarded in self._domains.values():
            monitor = guarded.monitor
            while monitor is not None and monitor.poll(0):
                event = zmq.utils.monitor.parse_monitor_message(monitor.recv_multipart())
                if event["event"] == zmq.EVENT_ACCEPTED:
                    guarded.open_fds.add(int(event["value"]))
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    guarded.open_fds.discard(int(event["value"]))
                    # Closed by the controller, or dropped by the heartbeat (a dead peer, or a controller that
                    # stopped reading without pinging): frames still on it are gone, and only the resend rule
                    # brings their tiles' answers back: a warning, so that a loss is never silent.
                    log.warning(
                        "a %s connection closed (by its peer, refused, or no answer to the heartbeat): answers "
                        "still on it are lost unless the controller resends its unanswered tiles (docs/protocol.md, "
                        "resend rule, and keep the feedback connection alive)",
                        guarded.role,
                    )

    def _answer_waiting(self) -> None:
        still_waiting = []
        for deadline, request in self._waiting:
            reply = self._reply(request, final=time.monotonic() >= deadline)
            if reply is None:
                still_waiting.append((deadline, request))
            else:
                self._zap.send_multipart(reply)
        self._waiting = still_waiting

    def _reply(self, request: list[bytes], final: bool) -> list[bytes] | None:
        """The ZAP reply to `request`, or None to wait for the feedback socket's current peer to go."""
        # A ZAP request through the ROUTER: peer id, empty delimiter, version, request id, domain,
        # peer address, routing id, mechanism, credentials...
        peer, delimiter, version, request_id, domain, address, _routing_id, mechanism, *credentials = request
        self._attach_pending()
        self._read_monitors()
        guarded = self._domains.get(domain)
        refusal = _refusal(guarded, mechanism, credentials)
        # The asking connection is one of open_fds (or not seen yet): any other one is a second peer.
        if not refusal and guarded is not None and guarded.role == "feedback" and len(guarded.open_fds) > 1:
            if not final:
                return None
            refusal = "the feedback socket already has its one peer (the controller)"
        envelope = [peer, delimiter, version, request_id]
        if refusal:
            log.warning(
                "refused a %s connection from %s: %s", domain.decode(errors="replace"), address.decode(), refusal
            )
            return [*envelope, b"400", refusal.encode(), b"", b""]
        return [*envelope, b"200", b"OK", b"", b""]


def _refusal(guarded: _Guarded | None, mechanism: bytes, credentials: list[bytes]) -> str:
    """Why a connection to a guarded socket is refused; "" admits it."""
    if guarded is None:
        return "unknown ZAP domain"
    if guarded.curve:
        if mechanism != b"CURVE" or not credentials:
            return "CURVE required"
        if zmq.utils.z85.encode(credentials[0]) not in guarded.allowed_keys:
            return "controller public key not pinned in rig.yaml (security.controller_public_keys)"
    return ""


_handlers: dict[int, ZapHandler] = {}
_handlers_lock = threading.Lock()


def _zap_handler_for(context: zmq.Context) -> ZapHandler:
    """One ZAP handler per context (libzmq allows one binder of the ZAP endpoint per context)."""
    with _handlers_lock:
        handler = _handlers.get(context.underlying)
        if handler is None or handler.stopped:
            handler = _handlers[context.underlying] = ZapHandler(context)
        return handler
