"""Who may talk to the ZeroMQ sockets: CURVE with pinned keys, one feedback peer, key files, the config rule.

Real libzmq sockets on loopback (no Ray): the appliance's socket guard on one side, controllers and
strangers on the other.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from appliance.config import RigConfig, SecurityConfig, endpoint_is_loopback
from appliance.serving.ray_lockdown import ensure_token_file
from appliance.stream.feedback import FeedbackChannel
from appliance.stream.protocol import decode_feedback, encode_feedback
from appliance.stream.zmq_security import (
    SECOND_PEER_WAIT_S,
    CurveKeys,
    keep_feedback_connection_alive,
    load_key_pair,
    max_message_bytes,
    secure_client_socket,
    secure_server_socket,
    write_key_pair,
)

TIER = "system"
REPLIES = 40


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, CurveKeys]:
    names = ("server", "controller", "stranger")
    return {name: load_key_pair(write_key_pair(tmp_path / "keys", name)[1]) for name in names}


def curve_security(tmp_path: Path, keys: dict[str, CurveKeys]) -> SecurityConfig:
    return SecurityConfig(
        curve=True,
        server_secret_key_file=tmp_path / "keys" / "server.key_secret",
        controller_public_keys=[keys["controller"].public.decode()],
    )


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    # The appliance's side: its own context, as in the sink actor (the ZAP handler lives in it).
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def peers() -> Iterator[zmq.Context]:
    # Controllers and strangers: another context, as another process would have.
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def feedback_socket(context: zmq.Context, security: SecurityConfig) -> tuple[zmq.Socket, str]:
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    secure_server_socket(push, security, "feedback")
    push.bind("tcp://127.0.0.1:*")
    return push, push.getsockopt_string(zmq.LAST_ENDPOINT)


def pull(peers: zmq.Context, endpoint: str, client: CurveKeys | None = None, server: bytes = b"") -> zmq.Socket:
    socket = peers.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    if client is not None:
        secure_client_socket(socket, client, server)
    socket.connect(endpoint)
    return socket


def send_replies(push: zmq.Socket, count: int = REPLIES) -> int:
    """Send like the sink does (never blocking); returns how many went out."""
    sent = 0
    for index in range(count):
        if push.poll(2000, zmq.POLLOUT):
            push.send(b"reply %d" % index, zmq.NOBLOCK)
            sent += 1
    return sent


def received(socket: zmq.Socket, wait_ms: int = 300) -> int:
    count = 0
    while socket.poll(wait_ms):
        socket.recv()
        count += 1
    return count


def wait_until_connected(push: zmq.Socket, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not push.poll(10, zmq.POLLOUT):
        assert time.monotonic() < deadline, "the controller never got in"


def test_a_stranger_pull_on_the_feedback_port_gets_nothing_without_curve(
    context: zmq.Context, peers: zmq.Context
) -> None:
    push, endpoint = feedback_socket(context, SecurityConfig())
    controller = pull(peers, endpoint)
    wait_until_connected(push)
    stranger = pull(peers, endpoint)
    time.sleep(SECOND_PEER_WAIT_S + 0.5)  # the stranger's handshake is held, then refused
    assert send_replies(push) == REPLIES
    assert (received(controller), received(stranger)) == (REPLIES, 0)


def test_the_controller_gets_back_in_after_it_reconnects(context: zmq.Context, peers: zmq.Context) -> None:
    push, endpoint = feedback_socket(context, SecurityConfig())
    first = pull(peers, endpoint)
    wait_until_connected(push)
    first.close(linger=0)
    again = pull(peers, endpoint)  # a restarted controller, at once
    time.sleep(1.0)  # PUSH may still deal to the old pipe until libzmq has seen it close
    assert send_replies(push) == REPLIES
    assert received(again) == REPLIES


def test_with_curve_only_the_pinned_controller_key_gets_feedback(
    context: zmq.Context, peers: zmq.Context, tmp_path: Path, keys: dict[str, CurveKeys]
) -> None:
    push, endpoint = feedback_socket(context, curve_security(tmp_path, keys))
    server = keys["server"].public
    # Strangers first: with CURVE they are refused at once, whoever comes first.
    stranger_key = pull(peers, endpoint, keys["stranger"], server)
    stranger_plain = pull(peers, endpoint)
    time.sleep(0.5)
    controller = pull(peers, endpoint, keys["controller"], server)
    wait_until_connected(push)
    assert send_replies(push) == REPLIES
    assert (received(controller), received(stranger_key), received(stranger_plain)) == (REPLIES, 0, 0)


def test_with_curve_only_the_pinned_controller_key_can_send_tiles(
    context: zmq.Context, peers: zmq.Context, tmp_path: Path, keys: dict[str, CurveKeys]
) -> None:
    tiles = context.socket(zmq.PULL)
    tiles.setsockopt(zmq.LINGER, 0)
    secure_server_socket(tiles, curve_security(tmp_path, keys), "tiles", max_frame_bytes=1024)
    tiles.bind("tcp://127.0.0.1:*")
    endpoint = tiles.getsockopt_string(zmq.LAST_ENDPOINT)
    senders = {}
    for who, client in (("stranger", keys["stranger"]), ("plain", None), ("controller", keys["controller"])):
        push = peers.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        if client is not None:
            secure_client_socket(push, client, keys["server"].public)
        push.connect(endpoint)
        senders[who] = push
    for who, push in senders.items():
        push.send(who.encode(), zmq.NOBLOCK)  # queued until (unless) the handshake succeeds
    got = []
    while tiles.poll(1000):
        got.append(tiles.recv())
    assert got == [b"controller"]


def test_a_frame_above_the_limit_drops_the_sender_and_the_socket_keeps_working(
    context: zmq.Context, peers: zmq.Context
) -> None:
    tiles = context.socket(zmq.PULL)
    tiles.setsockopt(zmq.LINGER, 0)
    secure_server_socket(tiles, SecurityConfig(), "tiles", max_frame_bytes=1024)
    tiles.bind("tcp://127.0.0.1:*")
    endpoint = tiles.getsockopt_string(zmq.LAST_ENDPOINT)
    assert tiles.getsockopt(zmq.MAXMSGSIZE) == max_message_bytes(1024) == 2 * 1024 + 64 * 1024
    big = peers.socket(zmq.PUSH)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(endpoint)
    big.send(b"x" * (2 * 1024 * 1024))
    assert not tiles.poll(500)  # refused, never delivered
    small = peers.socket(zmq.PUSH)
    small.setsockopt(zmq.LINGER, 0)
    small.connect(endpoint)
    small.send(b"a tile")
    assert tiles.poll(2000) and tiles.recv() == b"a tile"


@pytest.mark.fast
def test_generated_keys_load_and_the_secret_is_private(tmp_path: Path) -> None:
    public_path, secret_path = write_key_pair(tmp_path / "keys", "server")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    public_only, pair = load_key_pair(public_path), load_key_pair(secret_path)
    assert public_only.public == pair.public and len(pair.public) == 40
    assert public_only.secret is None and pair.secret is not None and len(pair.secret) == 40
    assert zmq.curve_public(pair.secret) == pair.public
    with pytest.raises(FileExistsError, match="server.key"):
        write_key_pair(tmp_path / "keys", "server")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///run/appliance.sock", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.0.2.7:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_endpoint_is_loopback(endpoint: str, loopback: bool) -> None:
    assert endpoint_is_loopback(endpoint) is loopback


@pytest.mark.fast
def test_a_network_endpoint_without_curve_is_refused_unless_allowed_explicitly(tmp_path: Path) -> None:
    network = {"tile_endpoint": "tcp://0.0.0.0:5555"}
    with pytest.raises(ValueError, match=r"ingest.tile_endpoint .* security.curve is false"):
        RigConfig.model_validate({"ingest": network})
    allowed = RigConfig.model_validate({"ingest": network, "security": {"allow_unauthenticated_network": True}})
    assert allowed.security.allow_unauthenticated_network
    key = "x" * 40
    with_curve = {"curve": True, "server_secret_key_file": str(tmp_path / "s"), "controller_public_keys": [key]}
    assert RigConfig.model_validate({"ingest": network, "security": with_curve}).security.curve
    assert not RigConfig().security.curve  # the loopback default needs neither


@pytest.mark.fast
def test_curve_without_keys_or_with_a_malformed_key_is_refused() -> None:
    with pytest.raises(ValueError, match="server_secret_key_file"):
        SecurityConfig(curve=True)
    with pytest.raises(ValueError, match="controller_public_keys"):
        SecurityConfig.model_validate({"controller_public_keys": ["too short"]})


@pytest.mark.fast
def test_the_ray_token_file_is_made_private_and_kept(tmp_path: Path) -> None:
    token = ensure_token_file(tmp_path / "ray" / "auth_token")
    first = token.read_text()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(first) == 64
    token.chmod(0o644)  # e.g. written by `ray get-auth-token --generate` under a loose umask
    assert ensure_token_file(token).read_text() == first
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_a_controller_that_stops_reading_feedback_for_long_keeps_its_connection_and_every_frame(
    context: zmq.Context, peers: zmq.Context
) -> None:
    # The appliance heartbeats its feedback connection and drops it after 3 s without traffic back. A
    # controller whose PULL is full reads nothing, PONGs included: without its own pings the connection
    # was dropped after ~7 s of not reading and the frames on it were lost (the stalled-reader drill lost
    # 56 errors and 6 answers so, under load). Stalled 12 s here, with the buffers of the drill's controller.
    channel = FeedbackChannel(context, "tcp://127.0.0.1:*", max_pending=4)
    controller = peers.socket(zmq.PULL)
    controller.setsockopt(zmq.LINGER, 0)
    controller.setsockopt(zmq.RCVHWM, 1)
    controller.setsockopt(zmq.RCVBUF, 4096)
    keep_feedback_connection_alive(controller)
    controller.connect(channel.endpoint)
    frames = [encode_feedback("draining", message=f"{n} " + "x" * 300) for n in range(1000)]
    try:
        for frame in frames:
            channel.send(frame)
        stalled_until = time.monotonic() + 12.0
        while time.monotonic() < stalled_until:  # the sink's periodic flush, while nobody reads
            channel.flush()
            time.sleep(0.1)
        assert channel.pending > 0, "the stall never filled the buffers: nothing was at risk"
        got: list[str] = []
        deadline = time.monotonic() + 20
        while len(got) < len(frames) and time.monotonic() < deadline:
            channel.flush()
            if controller.poll(2):
                got.append(decode_feedback(controller.recv())["message"].split()[0])
        assert got == [str(n) for n in range(len(frames))]  # every frame, in order, none lost
    finally:
        channel.close()
