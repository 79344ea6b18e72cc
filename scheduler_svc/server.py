"""The public gRPC service: a thin face over the Frontend, which the HTTP API shares."""
from __future__ import annotations

import asyncio
import logging

import grpc

from scheduler_svc.engine import Engine
from scheduler_svc.frontend import Frontend, RequestError
from scheduler_svc.security import RequireBearerToken
from shared.service import NO_REUSEPORT, add_health_and_reflection, message_limits
from tinyvllm.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request, context):
        try:
            stream = await self.frontend.start(request)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        try:
            async for response in stream:
                yield response
        finally:
            stream.close()  # the client cancelled or disconnected: abort the request

    async def Abort(self, request, context) -> scheduler_pb2.AbortResponse:
        if not self.frontend.engine.abort_request(request.request_id, "aborted by an Abort call"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no running or waiting request {request.request_id!r}")
        return scheduler_pb2.AbortResponse()

    async def GetServerInfo(self, request, context) -> scheduler_pb2.ServerInfo:
        e = self.frontend.engine
        running, waiting = e.counts()
        return scheduler_pb2.ServerInfo(
            # no absolute filesystem paths to clients: the model directory's name only
            model_path=e.info.model_name, model_name=e.info.model_name, vocab_size=e.info.vocab_size,
            max_context=e.info.max_context, block_size=e.info.block_size, total_kv_blocks=e.blocks.total_blocks,
            free_kv_blocks=e.blocks.num_free, running_requests=running, waiting_requests=waiting,
            device=e.info.device, decode_batch_sizes=list(e.info.decode_batch_sizes), stats=e.stats_proto(),
            kv_cache_usage=e.blocks.usage, prefix_cache_hit_rate=e.blocks.hit_rate)


async def serve(frontend: Frontend, host: str, port: int, credentials: grpc.ServerCredentials | None = None,
                token: str = "") -> tuple[grpc.aio.Server, int]:
    """credentials: TLS, or None for plaintext; token: the bearer token every call must carry, "" for none."""
    max_bytes = int(frontend.limits.max_request_mb * 2**20)
    server = grpc.aio.server(options=[*NO_REUSEPORT, *message_limits(max_bytes)],
                             interceptors=[RequireBearerToken(token)] if token else [])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(frontend), server)
    add_health_and_reflection(server, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name], aio=True)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    log.info("scheduler serving gRPC on %s:%d (%s%s)", host, bound, "TLS" if credentials else "plaintext",
             ", bearer token required" if token else "")
    return server, bound


async def drain(frontend: Frontend, grace_s: float) -> None:
    """Shutdown: new requests get UNAVAILABLE (retryable elsewhere); streams in flight, gRPC and HTTP, get
    `grace_s` to finish, then end with FINISH_REASON_ABORT and a message, not a bare CANCELLED."""
    frontend.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while frontend.streams and loop.time() < deadline:
        await asyncio.sleep(0.05)
    frontend.engine.abort_all("the server is shutting down")
    for _ in range(20):  # let the streams send their last message
        if not frontend.streams:
            break
        await asyncio.sleep(0.05)
