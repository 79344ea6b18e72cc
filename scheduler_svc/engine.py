"""The scheduler's event loop: schedule a batch, send it to the worker, apply the sampled tokens, stream them.

Everything runs on one asyncio loop, the gRPC server's, so sequence state needs no locks: new requests are
added between worker calls, and streaming and detokenization happen while no call is outstanding.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.scheduler import ScheduledBatch, Scheduler
from scheduler_svc.sequence import Sampling, Sequence
from scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer
from shared.service import GRPC_OPTIONS
from tinyvllm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# the worker went away (crash, restart, network) or is a new instance (FAILED_PRECONDITION: restarted while we
# were idle): reconnect, then recompute every running sequence. Any other error is about this batch (a bug, a
# device failure): its requests are aborted and serving goes on.
WORKER_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.FAILED_PRECONDITION}
RETRY_EVERY_S = 1.0
# reconnect to a worker within a second of its return: gRPC's default backoff grows to 120 s while a worker is
# away or warming up, and the first token after a restart waited for it (12-51 s)
WORKER_CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200),
                          ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass
class StepStats:
    """Counters for the share of time the gRPC hop costs (issue: hide the scheduler-worker latency)."""

    calls: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    worker_seconds: float = 0.0


class Engine:
    def __init__(self, worker_address: str, execute_timeout_s: float = 600.0):
        self.worker_address = worker_address
        self.execute_timeout_s = execute_timeout_s
        self.channel = grpc.aio.insecure_channel(worker_address, options=WORKER_CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.info: worker_pb2.WorkerInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.blocks: BlockManager | None = None
        self.scheduler: Scheduler | None = None
        self.stats = StepStats()
        self._wake = asyncio.Event()
        self._inflight: set[Sequence] = set()
        self._task: asyncio.Task | None = None
        self._by_id: dict[str, Sequence] = {}
        self.restarts = 0  # times a new worker instance was refilled

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 600.0) -> None:
        self.info = await self._fetch_worker_info(connect_timeout_s)
        info = self.info
        self.tokenizer = Tokenizer(info.tokenizer_model, info.add_bos_token, info.bos_token_id,
                                   list(info.eos_token_ids))
        self.blocks = BlockManager(info.num_kv_blocks, info.block_size)
        self.scheduler = Scheduler(self.blocks, list(info.decode_batch_sizes),
                                   [(s.rows, s.tokens) for s in info.prefill_shapes], info.max_steps_per_call)
        log.info("worker %s: %s on %s, %d KV blocks, buckets %s", self.worker_address, info.model_name,
                 info.device, info.num_kv_blocks - 1, list(info.decode_batch_sizes))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.channel.close()

    async def _fetch_worker_info(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        """Waits for the worker (it serves only once its graphs are captured); timeout_s may be inf."""
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            try:
                return await self.stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), wait_for_ready=True,
                                                     timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    raise
                attempts += 1
                if attempts % 10 == 1:
                    log.warning("worker %s not ready (%s), waiting", self.worker_address, exc.code().name)
                await asyncio.sleep(RETRY_EVERY_S)

    # ---- requests ----------------------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Tokens one sequence may hold: the context length, and what the KV pool can hold on its own."""
        return min(self.info.max_context, self.blocks.total_blocks * self.info.block_size)

    def new_sequence(self, request_id: str, prompt_ids: list[int], sampling: Sampling) -> Sequence:
        if sampling.seed is None:
            sampling.seed = random.getrandbits(32)
        seq = Sequence(request_id=request_id or uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling,
                       max_length=self.max_length, detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
                       table_width=self.info.block_table_width, eos_ids=self.tokenizer.eos_ids)
        if seq.remaining <= 0:  # max_tokens == 0 is refused earlier; this is a prompt at the length limit
            raise ValueError("the prompt leaves no room for new tokens")
        return seq

    def is_running(self, request_id: str) -> bool:
        return request_id in self._by_id

    def submit(self, seq: Sequence) -> None:
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)
        self._wake.set()

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """The client went away: finish now; the blocks are freed at once unless a worker call is using them."""
        if seq.finish:
            return
        seq.outbox.put_nowait(seq.abort(reason))
        if seq not in self._inflight:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._by_id.pop(seq.request_id, None)

    # ---- the loop ---------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = self.scheduler.schedule()
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run(batch)
            except Exception as exc:  # a bug or a device failure must not stop serving everybody else
                log.exception("batch failed; aborting its requests")
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else f"internal error: {exc}"
                for seq in batch.seqs:
                    if not seq.finish:
                        seq.outbox.put_nowait(seq.abort(reason))
                    self._finish(seq)
            finally:
                self._inflight.clear()

    async def _run(self, batch: ScheduledBatch) -> None:
        request = self._encode(batch)
        self._inflight = set(batch.seqs)
        t0 = time.perf_counter()
        try:
            response = await self.stub.Execute(request, timeout=self.execute_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in WORKER_LOST:
                await self._recover(exc)
                return
            raise
        self.stats.calls += 1
        self.stats.wall_seconds += time.perf_counter() - t0
        self.stats.worker_seconds += response.device_seconds
        sampled = np.frombuffer(response.token_ids, dtype=np.int32).reshape(batch.rows, batch.num_steps)
        self._apply(batch, sampled)

    def _encode(self, batch: ScheduledBatch) -> worker_pb2.ExecuteRequest:
        """Pads the batch to its bucket: padding rows have chunk_len 0 and a table of null blocks."""
        B, T, n = batch.rows, batch.tokens, len(batch.seqs)
        tokens = np.zeros((B, T), np.int32)
        positions, chunk_lens, top_k = (np.zeros(B, np.int32) for _ in range(3))
        temperature, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        seeds, counters = np.zeros(B, np.uint32), np.zeros(B, np.uint32)
        tables = np.zeros((B, self.info.block_table_width), np.int32)
        for i, (seq, length) in enumerate(zip(batch.seqs, batch.chunk_lens)):
            start = seq.num_computed
            tokens[i, :length] = seq.tokens[start:start + length]
            positions[i], chunk_lens[i] = start, length
            s = seq.sampling
            temperature[i], top_p[i], top_k[i], seeds[i] = s.temperature, s.top_p, s.top_k, s.seed
            counters[i] = len(seq.output_ids)
        if n:
            tables[:n] = np.stack([seq.table_row for seq in batch.seqs])
        return worker_pb2.ExecuteRequest(
            rows=B, tokens=T, num_steps=batch.num_steps, token_ids=tokens.tobytes(), positions=positions.tobytes(),
            chunk_lens=chunk_lens.tobytes(), block_tables=tables.tobytes(), temperature=temperature.tobytes(),
            top_p=top_p.tobytes(), top_k=top_k.tobytes(), seeds=seeds.tobytes(), counters=counters.tobytes(),
            instance_id=self.info.instance_id)

    def _apply(self, batch: ScheduledBatch, sampled: np.ndarray) -> None:
        for i, (seq, length) in enumerate(zip(batch.seqs, batch.chunk_lens)):
            if seq.finish:  # aborted while the call ran
                self._finish(seq)
                continue
            if batch.is_prefill:
                seq.num_computed += length
                new = [int(sampled[i, 0])] if seq.num_pending == 0 else []
            else:
                new = sampled[i, :batch.num_steps].tolist()
            delta = None
            if new:
                delta = seq.append(new)
                self.stats.tokens += len(delta.token_ids)
                seq.num_computed = len(seq.tokens) - 1  # every token but the newest has its K/V written
            self.blocks.register_full_blocks(seq.blocks, seq.tokens, seq.num_computed)
            if delta is not None:
                seq.outbox.put_nowait(delta)
            if seq.finish:
                self._finish(seq)

    async def _recover(self, exc: grpc.aio.AioRpcError) -> None:
        """The worker failed mid-call: recompute every running sequence, on the same or a restarted worker."""
        log.error("worker call failed (%s: %s); recomputing %d running sequences", exc.code().name,
                  exc.details(), len(self.scheduler.running))
        self.scheduler.preempt_all()
        for seq in list(self._inflight):
            if seq.finish:
                self._finish(seq)
        info = await self._fetch_worker_info(timeout_s=float("inf"))
        if info.instance_id != self.info.instance_id:
            layout = (info.num_kv_blocks, info.block_size, info.block_table_width, info.max_context)
            if layout != (self.info.num_kv_blocks, self.info.block_size, self.info.block_table_width,
                          self.info.max_context):
                raise RuntimeError("the restarted worker has a different KV cache layout; restart the scheduler too")
            self.blocks.forget_cached_contents()
            self.restarts += 1
            log.info("worker restarted (instance %s); refilling from the scheduler's state", info.instance_id[:8])
        self.info = info

    # ---- introspection -----------------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        return len(self.scheduler.running), len(self.scheduler.waiting)

