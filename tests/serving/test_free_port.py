"""A wildcard port resolved at start but taken before its actor binds it: fresh ports, not a failed start."""

from __future__ import annotations

import pytest
import ray
import zmq

from appliance.serving.microscope import PORT_ATTEMPTS, on_free_ports

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

    def start(endpoints: list[str]) -> tuple[ray.actor.ActorHandle, str]:
        (endpoint,) = endpoints
        tried.append(endpoint)
        if len(tried) < PORT_ATTEMPTS:  # another process takes the port first, every attempt but the last
            squatter = context.socket(zmq.PULL)
            squatter.setsockopt(zmq.LINGER, 0)
            squatter.bind(endpoint)
            squatters.append(squatter)
        actor = BindingActor.remote(endpoint)
        return actor, ray.get(actor.endpoint.remote())

    def bind_each(endpoints: list[str]) -> list[str]:
        tried.extend(endpoints)
        actors = [BindingActor.remote(endpoint) for endpoint in endpoints]
        return ray.get([actor.endpoint.remote() for actor in actors])

    try:
        [endpoint], (_, bound) = on_free_ports(["tcp://127.0.0.1:*"], start)
        assert len(tried) == PORT_ATTEMPTS and len(set(tried)) == PORT_ATTEMPTS
        assert endpoint == bound == tried[-1]
        # A fixed port is the controller's: taken, the start fails as it is, with no other port tried, also
        # when the same start binds a wildcard port beside it (the error names the address that was taken).
        fixed = squatters[0].getsockopt_string(zmq.LAST_ENDPOINT)
        for configured in ([fixed], ["tcp://127.0.0.1:*", fixed]):
            tried.clear()
            with pytest.raises(ray.exceptions.RayError, match="Address already in use"):
                on_free_ports(configured, bind_each)
            assert tried[-1] == fixed and len(tried) == len(configured), tried
    finally:
        for squatter in squatters:
            squatter.close()
        context.term()
