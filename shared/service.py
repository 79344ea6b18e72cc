"""What both gRPC services set up the same way: health checking, reflection, message limits, logging."""
from __future__ import annotations

import logging

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # between scheduler and worker: a large batch's arrays


def message_limits(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


GRPC_OPTIONS = message_limits(MAX_MESSAGE_BYTES)
# servers only: without this, gRPC's SO_REUSEPORT lets a second server bind a port that is already taken, silently
NO_REUSEPORT = [("grpc.so_reuseport", 0)]
SERVER_OPTIONS = [*GRPC_OPTIONS, *NO_REUSEPORT]


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
