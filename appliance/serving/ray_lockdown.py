"""The appliance's own Ray cluster, closed to the network: every listener on loopback, token auth on.

Ray runs arbitrary Python for anyone who can reach its GCS (`ray.init(address=...)` then a task), so
on a single-node rig nothing of Ray may be reachable from the LAN (docs/security.md):
- Loopback only. Ray 2.60's gRPC servers (GCS, raylet, object manager, every worker) and its agents bind
  the node IP. `ray.init(_node_ip_address="127.0.0.1")` and `ray start --node-ip-address=127.0.0.1`
  both replace a loopback address by the LAN address (`ray._private.services.resolve_ip_for_localhost`)
  before the node starts, and there is no public option to keep it. So the node is started with that one
  function bypassed for the duration of `ray.init`; tests/serving/test_ray_lockdown.py lists every
  listener of the process tree and fails if a Ray upgrade changes this.
- Serve's replicas open an inter-deployment gRPC server on `[::]:0`, hard-coded
  (ray/serve/_private/replica.py, `_on_initialized`). A worker setup hook (`serve_grpc_on_loopback`,
  run in every worker of this job, Serve's replicas included) makes that bind loopback instead.
- Token auth (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`): a per-rig token file, mode 0600, created
  when missing. Every Ray process started here inherits both variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray._private.services as ray_services

from appliance.config import SecurityConfig

log = logging.getLogger(__name__)

LOOPBACK_NODE_IP = "127.0.0.1"
TOKEN_BYTES = 32


def ensure_token_file(path: Path) -> Path:
    """Return `path`, creating it with a new random token (mode 0600) when missing.

    An existing file is kept (other Ray tools of the rig use it) but its mode is tightened to 0600 when
    others could read it. Creation is atomic: concurrent starts never see a half-written token.
    """
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        _create_token_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("Ray token file %s was readable by others (mode %o): set to 0600", path, mode)
        os.chmod(path, 0o600)
    if not path.read_text(encoding="ascii").strip():
        raise ValueError(f"security.ray_token_file {path} is empty: delete it and a new token is made at start")
    return path


def _create_token_file(path: Path) -> None:
    draft = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(TOKEN_BYTES))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(draft, path)  # fails if another start made one meanwhile: theirs is kept
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def enable_token_auth(token_file: Path) -> None:
    """Turn on Ray's token auth with `token_file` for this process and every Ray process it starts."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    # Ray caches the mode and the token in C++; refresh both (a test may have run Ray without auth).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    resolve = ray_services.resolve_ip_for_localhost
    ray_services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        ray_services.resolve_ip_for_localhost = resolve


def serve_grpc_on_loopback() -> None:
    """Worker setup hook: gRPC servers a worker asks to bind on every interface bind loopback instead.

    Serve's replica binds its inter-deployment gRPC server with `add_port_to_grpc_server(server, "[::]:0")`
    and imports that helper when its module loads, after this hook ran; its callers reach it through
    the node IP, which is loopback here.
    """
    import ray._common.tls_utils as tls_utils

    add_port = tls_utils.add_port_to_grpc_server
    if getattr(add_port, "_appliance_loopback", False):
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"{LOOPBACK_NODE_IP}:{port}"
        return int(add_port(server, address))

    add_port_on_loopback._appliance_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_on_loopback


def init_local_ray(security: SecurityConfig, **init_options: Any) -> None:
    """Start a local single-node Ray cluster on loopback with token auth; `init_options` go to ray.init."""
    enable_token_auth(ensure_token_file(security.ray_token_path))
    runtime_env = {"worker_process_setup_hook": f"{__name__}.serve_grpc_on_loopback"}
    with _loopback_node_ip():
        ray.init(_node_ip_address=LOOPBACK_NODE_IP, runtime_env=runtime_env, **init_options)
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(f"{LOOPBACK_NODE_IP}:"):
        ray.shutdown()
        raise RuntimeError(f"Ray's GCS came up on {gcs}, not on loopback: this Ray version ignores the node IP")
    log.info("local Ray cluster on loopback (GCS %s), token auth from %s", gcs, security.ray_token_path)
