"""What both gRPC services set up the same way: health checking, reflection, message limits, logging."""
from __future__ import annotations

import logging
import socket

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # between scheduler and worker: a large batch's arrays


def message_limits(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


GRPC_OPTIONS = message_limits(MAX_MESSAGE_BYTES)
# servers only: without this, gRPC's SO_REUSEPORT lets a second server bind a port that is already taken, silently
NO_REUSEPORT = [("grpc.so_reuseport", 0)]
SERVER_OPTIONS = [*GRPC_OPTIONS, *NO_REUSEPORT]
# clients of a service that may be away or warming up: see it within a second of its return. gRPC's default
# reconnect backoff grows to 120 s (a first token after a worker restart waited 12-51 s; a launcher noticed a
# worker that had finished warming up tens of seconds late)
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


class PortTaken(OSError):
    pass


def check_port_free(host: str, port: int) -> None:
    """Binds host:port and lets it go again, the way gRPC will bind it (SO_REUSEADDR, no SO_REUSEPORT): a port
    in use is found in a second, not after minutes of loading and warming up. Port 0 (any free port) passes."""
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise PortTaken(f"{host}:{port} is taken ({exc.strerror}): stop what listens there or pick "
                            "another --port") from None


def add_health_and_reflection(server, service_names: list[str], aio: bool) -> health.HealthServicer:
    """Registers grpc.health.v1.Health (every service SERVING) and server reflection, so grpcurl works."""
    servicer = health.aio.HealthServicer() if aio else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return servicer


def serving_status(ok: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
