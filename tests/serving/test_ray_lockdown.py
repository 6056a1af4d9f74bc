"""Nobody in: the running appliance listens on loopback only, and Ray refuses a driver without the rig's token.

A real appliance (its own local Ray cluster, Serve, ingest and sink actors, ZeroMQ sockets), its process
tree's listening sockets read from /proc, and strangers as separate Python processes.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray._private.authentication_test_utils import reset_auth_token_state

from appliance.config import IngestConfig, MetricsConfig, OutputConfig, RigConfig, SecurityConfig
from appliance.serving.pipeline import Appliance, RunningEndpoints
from tests.serving.listeners import Listener, lan_address, listeners_of_tree, ports_on_the_network

pytestmark = pytest.mark.system

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")

# A stranger who knows Ray: it keeps 127.0.0.1 as the appliance does (Ray would swap in the LAN address)
# and fails fast instead of retrying the GCS for a minute.
STRANGER = """
import sys
import ray
import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host
try:
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
    sys.exit(3)

@ray.remote
def stranger_code():
    return "RAN-IN-THE-APPLIANCE"

print(ray.get(stranger_code.remote(), timeout=60))
print("actors:", len(ray.util.list_named_actors(all_namespaces=True)))
"""


@dataclass
class LockedAppliance:
    endpoints: RunningEndpoints
    gcs_address: str
    token_file: Path
    listeners: list[Listener]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedAppliance]:
    """The appliance as a loopback rig runs it: its own Ray cluster, token in a per-rig file."""
    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("locked")
    cfg = RigConfig(
        ingest=IngestConfig(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*"),
        output=OutputConfig(directory=root / "out"),
        metrics=MetricsConfig(address="127.0.0.1:0"),
        security=SecurityConfig(ray_token_file=root / "secrets" / "ray_auth_token"),
    )
    saved_env = {name: os.environ.get(name) for name in AUTH_ENV}
    appliance = Appliance(cfg)
    endpoints = appliance.start()
    try:
        gcs = ray.get_runtime_context().gcs_address
        yield LockedAppliance(endpoints, gcs, root / "secrets" / "ray_auth_token", listeners_of_tree(os.getpid()))
    finally:
        appliance.drain_and_stop()
        # The next test module's cluster starts as conftest configures it (no token).
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].split("/")[0])


def test_every_listener_of_the_appliance_process_tree_is_on_loopback(locked: LockedAppliance) -> None:
    table = "\n".join(f"{lst.process:<18} pid {lst.pid:<7} {lst.ip}:{lst.port}" for lst in locked.listeners)
    ports = {listener.port for listener in locked.listeners}
    # The tree really is the appliance: Ray's GCS, both ZeroMQ sockets and the metrics endpoint are in it.
    expected = {_port(locked.gcs_address), _port(locked.endpoints.tile), _port(locked.endpoints.feedback)}
    expected.add(_port(locked.endpoints.metrics or ""))
    assert expected <= ports, f"missing {expected - ports} in\n{table}"
    processes = {listener.process for listener in locked.listeners}
    assert {"gcs_server", "raylet"} <= processes, table
    assert len(locked.listeners) >= 10, table  # GCS, raylet x2, every worker, the agents, ZeroMQ, metrics
    exposed = [listener for listener in locked.listeners if not listener.on_loopback]
    assert exposed == [], f"listening beyond loopback:\n{table}"


def test_the_ray_token_is_a_private_per_rig_file(locked: LockedAppliance) -> None:
    assert stat.S_IMODE(locked.token_file.stat().st_mode) == 0o600
    assert len(locked.token_file.read_text(encoding="ascii").strip()) == 64
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(locked.token_file)


def _run_stranger(gcs_address: str, home: Path, **auth_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # A stranger does not share this user's ~/.ray/auth_token; a refused driver gives up after 5 s.
    env.update(HOME=str(home), RAY_gcs_rpc_server_connect_timeout_s="5", PYTHONUNBUFFERED="1", **auth_env)
    return subprocess.run(
        [sys.executable, "-c", STRANGER, gcs_address], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_stranger_cannot_run_code_in_the_cluster(locked: LockedAppliance, tmp_path: Path) -> None:
    token = locked.token_file.read_text(encoding="ascii").strip()
    attempts = {
        "no token": {"RAY_AUTH_MODE": "disabled"},
        "a wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        "the rig's token (control)": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        futures = {who: pool.submit(_run_stranger, locked.gcs_address, tmp_path, **e) for who, e in attempts.items()}
        runs = {who: future.result() for who, future in futures.items()}
    for who in ("no token", "a wrong token"):
        run = runs[who]
        assert "RAN-IN-THE-APPLIANCE" not in run.stdout, f"{who}: {run.stdout}"
        assert run.returncode == 3 and "REFUSED" in run.stdout, f"{who}: {run.stdout}\n{run.stderr[-2000:]}"
        assert "Unauthenticated" in run.stderr or "InvalidAuthToken" in run.stderr, run.stderr[-2000:]
    # The same script with the token gets in: the refusals above are the token check, not a wrong address.
    control = runs["the rig's token (control)"]
    assert "RAN-IN-THE-APPLIANCE" in control.stdout, control.stdout + control.stderr[-2000:]


def test_no_listener_answers_on_the_lan_address(locked: LockedAppliance) -> None:
    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback address to try")
    # Other programs on this machine (another Ray, say) may hold one of our port numbers on the LAN.
    taken_elsewhere = ports_on_the_network()
    tried = [listener for listener in locked.listeners if listener.port not in taken_elsewhere]
    answered = []
    for listener in tried:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            if probe.connect_ex((lan, listener.port)) == 0:
                answered.append(listener)
    assert answered == [], f"reachable on {lan}: {answered}"
    assert len(tried) >= 8, f"only {len(tried)} ports tried; taken elsewhere: {sorted(taken_elsewhere)}"
