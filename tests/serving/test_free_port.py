"""A wildcard port resolved at start but taken before the actor binds it: a fresh port, not a failed start."""

from __future__ import annotations

import pytest
import ray
import zmq

from appliance.serving.microscope import PORT_ATTEMPTS, on_a_free_port

pytestmark = pytest.mark.system


@ray.remote
class BindingActor:
    """Binds a PULL socket in its constructor, as the sink (feedback) and the ingest (tiles) do."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)

    def endpoint(self) -> str:
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)


def test_a_port_taken_between_resolving_and_binding_is_resolved_again(ray_cluster: None) -> None:
    context = zmq.Context()
    squatters: list[zmq.Socket] = []
    tried: list[str] = []

    def start(endpoint: str) -> tuple[ray.actor.ActorHandle, str]:
        tried.append(endpoint)
        if len(tried) < PORT_ATTEMPTS:  # another process takes the port first, every attempt but the last
            squatter = context.socket(zmq.PULL)
            squatter.setsockopt(zmq.LINGER, 0)
            squatter.bind(endpoint)
            squatters.append(squatter)
        actor = BindingActor.remote(endpoint)
        return actor, ray.get(actor.endpoint.remote())

    try:
        endpoint, (_, bound) = on_a_free_port("tcp://127.0.0.1:*", start)
        assert len(tried) == PORT_ATTEMPTS and len(set(tried)) == PORT_ATTEMPTS
        assert endpoint == bound == tried[-1]
        # A fixed port is the controller's: taken, the start fails as it is, with no other port tried.
        fixed = squatters[0].getsockopt_string(zmq.LAST_ENDPOINT)
        tried.clear()
        with pytest.raises(ray.exceptions.RayError, match="Address already in use"):
            on_a_free_port(fixed, lambda e: (tried.append(e), ray.get(BindingActor.remote(e).endpoint.remote())))
        assert tried == [fixed]
    finally:
        for squatter in squatters:
            squatter.close()
        context.term()
