"""The public gRPC service: validates requests, feeds the engine, streams each sequence's deltas back."""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import grpc
import numpy as np

from scheduler_svc.engine import Engine
from scheduler_svc.sequence import Sampling
from shared.service import NO_REUSEPORT, add_health_and_reflection, message_limits
from tinyvllm.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    pass


def sampling_from_proto(p: scheduler_pb2.SamplingParams) -> Sampling:
    """Applies vLLM's defaults to unset fields and rejects values no sampler can honour."""
    s = Sampling()
    if p.HasField("max_tokens"):
        if p.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        s.max_tokens = p.max_tokens
    if p.HasField("temperature"):
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            raise InvalidRequest("temperature must be a finite number >= 0")
        s.temperature = p.temperature
    if p.HasField("top_p"):
        if not 0 < p.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]")
        s.top_p = p.top_p
    if p.HasField("top_k"):
        if p.top_k < -1:
            raise InvalidRequest("top_k must be -1 or 0 (off) or a positive count")
        s.top_k = max(0, p.top_k)
    if p.HasField("seed"):
        s.seed = (p.seed ^ (p.seed >> 32)) & 0xFFFFFFFF
    if any(not stop for stop in p.stop):
        raise InvalidRequest("stop strings must not be empty")
    s.stop = tuple(p.stop)
    s.stop_token_ids = frozenset(p.stop_token_ids)
    s.ignore_eos = p.ignore_eos
    s.min_tokens = p.min_tokens
    if s.min_tokens > s.max_tokens:
        raise InvalidRequest("min_tokens must not exceed max_tokens")
    return s


@dataclass
class Limits:
    """What one scheduler accepts before it answers RESOURCE_EXHAUSTED (flags of `python -m scheduler_svc`)."""

    max_request_mb: float = 4.0  # a GenerateRequest larger than this is refused by gRPC itself
    max_waiting: int = 1024  # requests queued for admission
    max_streams: int = 4096  # open Generate streams, running or waiting


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: Engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.streams = 0  # open Generate calls
        self.draining = False  # shutting down: new requests get UNAVAILABLE

    def _prompt_ids(self, request: scheduler_pb2.GenerateRequest) -> list[int]:
        """Tokenizes and checks the prompt. Runs in a thread: a large prompt must not stall the event loop."""
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidRequest("exactly one of prompt or prompt_token_ids is required")
        if which == "prompt":
            ids = self.engine.tokenizer.encode(request.prompt)
        else:
            array = np.asarray(request.prompt_token_ids.ids, dtype=np.int64)
            vocab = self.engine.info.vocab_size
            if array.size and (array.min() < 0 or array.max() >= vocab):
                raise InvalidRequest(f"prompt_token_ids must be in [0, {vocab})")
            ids = array.tolist()
        if not ids:
            raise InvalidRequest("the prompt is empty")
        limit = self.engine.max_length
        if len(ids) >= limit:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; at most {limit - 1} fit with one new token")
        return ids

    async def Generate(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        if self.streams >= self.limits.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.streams} streams are open, the limit (--max-streams); retry later")
        if self.engine.counts()[1] >= self.limits.max_waiting:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.limits.max_waiting} requests are waiting, the limit (--max-waiting); "
                                "retry later")
        self.streams += 1
        try:
            async for response in self._generate(request, context):
                yield response
        finally:
            self.streams -= 1

    async def _generate(self, request, context):
        try:
            sampling = sampling_from_proto(request.params)
            if any(not 0 <= i < self.engine.info.vocab_size for i in sampling.stop_token_ids):
                raise InvalidRequest("stop_token_ids must be valid token ids")
            prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
            seq = self.engine.new_sequence(request.request_id, prompt_ids, sampling)
        except (InvalidRequest, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.engine.is_running(seq.request_id):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {seq.request_id!r} is already running")
        self.engine.submit(seq)
        try:
            while True:
                delta = await seq.outbox.get()
                done = delta.finish != 0
                response = scheduler_pb2.GenerateResponse(
                    request_id=seq.request_id, token_ids=delta.token_ids, text=delta.text,
                    finish_reason=int(delta.finish))
                if done:
                    response.prompt_tokens = len(seq.prompt_ids)
                    response.completion_tokens = len(seq.output_ids)
                    response.stop_reason = delta.stop_reason
                    response.cached_prompt_tokens = seq.cached_prompt_tokens
                yield response
                if done:
                    return
        finally:
            if not seq.finish:  # the client cancelled or disconnected
                self.engine.abort(seq)

    async def GetServerInfo(self, request, context) -> scheduler_pb2.ServerInfo:
        e = self.engine
        running, waiting = e.counts()
        return scheduler_pb2.ServerInfo(
            # no absolute filesystem paths to clients: the model directory's name only
            model_path=e.info.model_name, model_name=e.info.model_name, vocab_size=e.info.vocab_size,
            max_context=e.info.max_context, block_size=e.info.block_size, total_kv_blocks=e.blocks.total_blocks,
            free_kv_blocks=e.blocks.num_free, running_requests=running, waiting_requests=waiting,
            device=e.info.device, decode_batch_sizes=list(e.info.decode_batch_sizes),
            stats=scheduler_pb2.EngineStats(
                worker_calls=e.stats.calls, worker_call_seconds=e.stats.wall_seconds,
                worker_busy_seconds=e.stats.worker_seconds, generated_tokens=e.stats.tokens,
                preemptions=e.scheduler.num_preemptions, worker_restarts=e.restarts))


async def serve(engine: Engine, host: str, port: int,
                limits: Limits | None = None) -> tuple[grpc.aio.Server, int, SchedulerServicer]:
    limits = limits or Limits()
    server = grpc.aio.server(options=[*NO_REUSEPORT, *message_limits(int(limits.max_request_mb * 2**20))])
    servicer = SchedulerServicer(engine, limits)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    add_health_and_reflection(server, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name], aio=True)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    log.info("scheduler serving on %s:%d", host, bound)
    return server, bound, servicer


async def drain(server: grpc.aio.Server, servicer: SchedulerServicer, engine: Engine, grace_s: float) -> None:
    """Shutdown: new requests get UNAVAILABLE (retryable elsewhere); streams in flight get `grace_s` to finish,
    then end with FINISH_REASON_ABORT and a message, not a bare CANCELLED."""
    servicer.draining = True
    deadline = asyncio.get_running_loop().time() + grace_s
    while servicer.streams and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    engine.abort_all("the server is shutting down")
    for _ in range(20):  # let the streams send their last message
        if not servicer.streams:
            break
        await asyncio.sleep(0.05)
    await server.stop(grace=1)
