"""The public gRPC service: validates requests, feeds the engine, streams each sequence's deltas back."""
from __future__ import annotations

import logging
import math

import grpc

from scheduler_svc.engine import Engine
from scheduler_svc.sequence import Sampling
from shared.service import SERVER_OPTIONS, add_health_and_reflection
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


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    def _prompt_ids(self, request: scheduler_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidRequest("exactly one of prompt or prompt_token_ids is required")
        if which == "prompt":
            ids = self.engine.tokenizer.encode(request.prompt)
        else:
            ids = list(request.prompt_token_ids.ids)
            vocab = self.engine.info.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise InvalidRequest(f"prompt_token_ids must be in [0, {vocab})")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        limit = self.engine.max_length
        if len(ids) >= limit:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; at most {limit - 1} fit with one new token")
        return ids

    async def Generate(self, request, context):
        try:
            sampling = sampling_from_proto(request.params)
            if any(not 0 <= i < self.engine.info.vocab_size for i in sampling.stop_token_ids):
                raise InvalidRequest("stop_token_ids must be valid token ids")
            seq = self.engine.new_sequence(request.request_id, self._prompt_ids(request), sampling)
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
            model_path=e.info.model_path, model_name=e.info.model_name, vocab_size=e.info.vocab_size,
            max_context=e.info.max_context, block_size=e.info.block_size, total_kv_blocks=e.blocks.total_blocks,
            free_kv_blocks=e.blocks.num_free, running_requests=running, waiting_requests=waiting,
            device=e.info.device, decode_batch_sizes=list(e.info.decode_batch_sizes),
            stats=scheduler_pb2.EngineStats(
                worker_calls=e.stats.calls, worker_call_seconds=e.stats.wall_seconds,
                worker_busy_seconds=e.stats.worker_seconds, generated_tokens=e.stats.tokens,
                preemptions=e.scheduler.num_preemptions, worker_restarts=e.restarts))


async def serve(engine: Engine, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(engine), server)
    add_health_and_reflection(server, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name], aio=True)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    log.info("scheduler serving on %s:%d", host, bound)
    return server, bound
