"""Supervision of the sink and ingest actors: Ray restarts a dead one, this notices and resumes it.

Ray restarts the actor process (max_restarts) with the same constructor arguments, so it binds the same
resolved endpoints again (pipeline.resolve_endpoint). The supervisor polls each actor's pid every
`every_s`: a call that fails means the actor is down; a new pid means Ray restarted it. Then it resumes
the ingest's receive loop and sends the controller `alarm` kind `restarted`, so every tile without an
answer is resent (the sink's idempotent write answers a recorded one again with `repeat: true`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

log = logging.getLogger(__name__)

WATCH_EVERY_S = 0.5
HEALTH_TIMEOUT_S = 2.0  # a busy actor answers a ping in ms; no answer by then counts as down


@dataclass
class Restart:
    """One recovery: which actor, when it was first seen down and when it was resumed (time.time() s)."""

    which: str
    t_down: float
    t_resumed: float

    @property
    def recovery_s(self) -> float:
        return self.t_resumed - self.t_down


class Supervisor:
    """Watches {"sink": handle, "ingest": handle} from a driver thread; `restarts` lists the recoveries."""

    def __init__(self, actors: dict[str, Any], every_s: float = WATCH_EVERY_S) -> None:
        self._actors = actors
        self._every_s = every_s
        self._pids = {which: self._pid(actor) for which, actor in actors.items()}
        self._down_since: dict[str, float] = {}
        self.restarts: list[Restart] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HEALTH_TIMEOUT_S + 5)

    def pids(self) -> dict[str, int | None]:
        """The process id of each actor as last seen (None while it is down)."""
        return {which: (None if which in self._down_since else pid) for which, pid in self._pids.items()}

    def _watch(self) -> None:
        while not self._stop.wait(self._every_s):
            for which, actor in self._actors.items():
                try:
                    self._check(which, actor)
                except Exception:  # the supervisor itself must keep watching
                    log.exception("supervisor: could not check the %s", which)

    def _check(self, which: str, actor: Any) -> None:
        try:
            pid = self._pid(actor)
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as exc:
            if which not in self._down_since:
                self._down_since[which] = time.time()
                log.error("the %s is down or not answering (%s); Ray restarts a dead one", which, type(exc).__name__)
            return
        if pid == self._pids[which]:
            if self._down_since.pop(which, None) is not None:
                log.warning("the %s answers again (same process: it was only slow)", which)
            return
        t_down = self._down_since.pop(which, time.time())
        if which == "ingest":
            ray.get(actor.start.remote())  # its receive loop, on the same endpoint as before
        ray.get(self._actors["sink"].send_restarted.remote(which))
        self._pids[which] = pid
        restart = Restart(which, t_down, time.time())
        self.restarts.append(restart)
        log.error("the %s was restarted (pid %d) and resumed %.1f s after it went down", which, pid, restart.recovery_s)

    @staticmethod
    def _pid(actor: Any) -> int:
        return int(ray.get(actor.health.remote(), timeout=HEALTH_TIMEOUT_S))
