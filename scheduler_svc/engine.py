"""The scheduler's event loop: plan a call, send it to the worker, apply the sampled tokens, stream them.

Everything runs on one asyncio loop, the gRPC server's, so sequence state needs no locks: new requests are
added while calls are in flight, and streaming and detokenization happen while the worker runs the next call.
Calls are pipelined (scheduler.PIPELINE_DEPTH): while the worker runs call N, call N+1 is already on its way,
planned from the state after N, so the worker never waits for this process. When N returns, its tokens are
applied, call N+2 is sent, and only then are the new tokens streamed; but a prefill's first tokens are streamed
before N+2 is planned (the worker has N+1 meanwhile), so a request's first token does not wait for the planning,
encoding and sending of another call (1.2 ms of a streamed request's TTFT on the 2-core machine). All sequence
state changes happen in the Scheduler (schedule, postprocess, discard); this module does the I/O.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter

import grpc
import numpy as np

from scheduler_svc.block_manager import BlockManager, BlockTable
from scheduler_svc.scheduler import PIPELINE_DEPTH, STREAM_STEPS, ScheduledBatch, Scheduler
from scheduler_svc.sequence import ROW_DTYPE, Finish, Sampling, Sequence
from scheduler_svc.chat import ChatTemplate, load_chat_template
from scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from shared.auth import call_metadata
from shared.service import FAST_RECONNECT, GRPC_OPTIONS
from tinyvllm.v1 import scheduler_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# the worker went away (crash, restart, network) or is a new instance (FAILED_PRECONDITION: restarted while we
# were idle): reconnect, then recompute every running sequence. Any other error is about this batch (a bug, a
# device failure): its requests are aborted and serving goes on.
WORKER_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.FAILED_PRECONDITION}
RETRY_EVERY_S = 1.0
FINISH_NAMES = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.ABORT: "abort", Finish.NONE: "abort"}
WORKER_TIMEOUT_S = 10.0  # default of --worker-timeout
STREAM_BUFFER = 1024  # default of --max-stream-buffer
# reconnect to a worker within a second of its return (shared.service.FAST_RECONNECT)
WORKER_CHANNEL_OPTIONS = [*GRPC_OPTIONS, *FAST_RECONNECT]


@dataclass
class StepStats:
    """Counters for the share of time the gRPC hop costs (issue: hide the scheduler-worker latency).

    wall_seconds is the time at least one call was outstanding (pipelined calls overlap, so it is not their sum),
    worker_seconds the time the worker spent running them: the difference is the time the worker waited."""

    calls: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    worker_seconds: float = 0.0
    refused_calls: int = 0  # pipelined calls the worker refused as out of order (then resent with token ids)
    prompt_tokens: int = 0  # prompt tokens of every request submitted
    finished: dict[str, int] = field(default_factory=dict)  # requests finished, by reason (stop, length, abort)


@dataclass
class _Call:
    """A call sent to the worker and not yet settled."""

    batch: ScheduledBatch
    task: asyncio.Task


class Engine:
    def __init__(self, worker_address: str, execute_timeout_s: float = 600.0,
                 pipeline_depth: int = PIPELINE_DEPTH, stream_steps: int = STREAM_STEPS, secret: str = "",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 worker_timeout_s: float = WORKER_TIMEOUT_S, stream_buffer: int = STREAM_BUFFER,
                 stream_interval: int = 0):
        self.worker_address = worker_address
        # how long requests wait for a lost worker's return; after that they end, and new ones are refused
        self.worker_timeout_s = worker_timeout_s
        self._lost_since: float | None = None  # when the worker was found gone; None while it serves
        self._recovering = False  # _recover is refilling the worker: only it may declare the worker back
        self._watch: asyncio.Task | None = None
        # messages a stream may have waiting for its client: a client that reads slower than the batch decodes
        # has its request aborted rather than stalling anyone or holding ever more memory
        self.stream_buffer = stream_buffer
        self.metadata = call_metadata(secret)  # the worker serves only callers with its secret (shared/auth.py)
        self.execute_timeout_s = execute_timeout_s
        self.pipeline_depth = pipeline_depth  # 1: no pipelining (each call waits for the previous result)
        self.stream_steps = stream_steps
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.stream_interval = stream_interval  # tokens per stream message; 0: by load (scheduler.STREAM_ROWS)
        self.channel = grpc.aio.insecure_channel(worker_address, options=WORKER_CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        # Execute with the request serialized by encode_batch (bytes in, ExecuteResponse out)
        self._execute = self.channel.unary_unary("/tinyvllm.v1.Worker/Execute", request_serializer=None,
                                                 response_deserializer=worker_pb2.ExecuteResponse.FromString)
        self.info: worker_pb2.WorkerInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.chat_template: ChatTemplate | None = None  # None: the checkpoint has none
        self.blocks: BlockManager | None = None
        self.scheduler: Scheduler | None = None
        self.stats = StepStats()
        self._wake = asyncio.Event()
        self._calls: deque[_Call] = deque()  # sent, oldest first; results are applied in this order
        self._broken = False  # a call failed: the calls after it are discarded, none is sent until all settled
        self._busy_since = 0.0
        self._task: asyncio.Task | None = None
        self._by_id: dict[tuple[str, int], Sequence] = {}  # (request id, sample index)
        self.restarts = 0  # times a new worker instance was refilled

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 600.0) -> None:
        self.info = await self._fetch_worker_info(connect_timeout_s)
        info = self.info
        self.tokenizer = load_tokenizer(info)
        eos_id = min(info.eos_token_ids) if info.eos_token_ids else -1
        self.chat_template = load_chat_template(
            info.chat_template, info.bos_token or self.tokenizer.token_text(info.bos_token_id),
            info.eos_token or self.tokenizer.token_text(eos_id))
        self.blocks = BlockManager(info.num_kv_blocks, info.block_size)
        self.scheduler = Scheduler(self.blocks, list(info.decode_batch_sizes),
                                   [(s.rows, s.tokens) for s in info.prefill_shapes], info.max_steps_per_call,
                                   max_inflight=self.pipeline_depth, stream_steps=self.stream_steps,
                                   call_base=random.getrandbits(48) << 8,  # never an earlier session's numbers
                                   num_slots=info.num_sampling_slots, max_num_seqs=self.max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens,
                                   stream_interval=self.stream_interval)
        log.info("worker %s: %s on %s, %d KV blocks, buckets %s", self.worker_address, info.model_name,
                 info.device, info.num_kv_blocks - 1, list(info.decode_batch_sizes))
        self._task = asyncio.create_task(self._loop())
        self._watch = asyncio.create_task(self._watch_channel())

    async def stop(self) -> None:
        for task in (self._task, self._watch):
            if task:
                task.cancel()
        await self.channel.close()

    async def _watch_channel(self) -> None:
        """Notices a worker lost while no call runs (no failed call would tell): its channel fails to connect.
        Then --worker-timeout counts from that moment, so requests arriving later are refused at once instead of
        waiting for the timeout; a channel that is ready again (outside a recovery) clears it."""
        state = self.channel.get_state(try_to_connect=True)
        while True:
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and self._lost_since is None:
                log.warning("worker %s unreachable", self.worker_address)
                self._lost_since = time.monotonic()
            elif state == grpc.ChannelConnectivity.READY and not self._recovering and self._lost_since is not None:
                log.info("worker %s reachable again", self.worker_address)
                self._lost_since = None

    async def _fetch_worker_info(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        """Waits for the worker (it serves only once its graphs are captured); timeout_s may be inf."""
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            try:
                return await self.stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), wait_for_ready=True,
                                                     metadata=self.metadata,
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

    def new_sequences(self, request_id: str, prompt_ids: list[int], sampling: Sampling, priority: int = 0,
                      n: int = 1, cache_salt: str = "") -> list[Sequence]:
        """The request's n samples: sample i seeded seed + i (each a seed's own run), one stream (a shared
        outbox), the later ones admitted after sample 0's prefill so that they share its prompt blocks."""
        request_id = request_id or uuid.uuid4().hex
        seed = random.getrandbits(64) if sampling.seed is None else sampling.seed
        outbox: asyncio.Queue = asyncio.Queue()
        seqs: list[Sequence] = []
        arrival = time.monotonic()
        for i in range(n):
            # the prompt's logprobs are the request's: sample 0 computes them, the others share its cached blocks
            s = dataclasses.replace(sampling, seed=(seed + i) & 0xFFFFFFFFFFFFFFFF,
                                    prompt_logprobs=sampling.prompt_logprobs if i == 0 else None)
            seqs.append(Sequence(request_id=request_id, prompt_ids=prompt_ids, sampling=s, max_length=self.max_length,
                                 detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
                                 eos_ids=self.tokenizer.eos_ids,
                                 priority=priority, index=i, leader=seqs[0] if seqs else None, arrival=arrival,
                                 outbox=outbox, blocks=BlockTable(salt=cache_salt)))
        return seqs

    @property
    def worker_down(self) -> bool:
        """The worker has been gone for worker_timeout_s or more: new requests are refused (UNAVAILABLE)."""
        return self._lost_since is not None and time.monotonic() - self._lost_since >= self.worker_timeout_s

    def is_running(self, request_id: str) -> bool:
        return (request_id, 0) in self._by_id

    def submit(self, seq: Sequence) -> None:
        self._by_id[(seq.request_id, seq.index)] = seq
        if seq.index == 0:
            self.stats.prompt_tokens += len(seq.prompt_ids)
        self.scheduler.add(seq)
        self._wake.set()

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """The client went away: finish now; the blocks are freed at once unless a call in flight uses them."""
        if seq.finish:
            return
        seq.outbox.put_nowait(seq.abort(reason))
        self._finish(seq)

    def abort_request(self, request_id: str, reason: str) -> bool:
        """The Abort RPC: False if no such request is running or waiting."""
        seqs = [seq for (rid, _), seq in self._by_id.items() if rid == request_id]  # every sample of it
        for seq in seqs:
            self.abort(seq, reason)
        return bool(seqs)

    def abort_all(self, reason: str) -> None:
        """Ends every request (the server shuts down): each stream gets FINISH_REASON_ABORT with `reason`."""
        for seq in list(self._by_id.values()):
            self.abort(seq, reason)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        key = (seq.request_id, seq.index)
        if self._by_id.get(key) is seq:  # the first time only: a finished sequence may be seen again
            del self._by_id[key]
            reason = FINISH_NAMES[seq.finish]
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    # ---- the loop ---------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._send_ready()
            if not self._calls:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._calls[0]
            if len(self._calls) < self.pipeline_depth and not self._broken:
                # room for another call: a request that arrives now is planned at once, not after this call
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({head.task, woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not head.task.done():
                    continue
            else:
                await asyncio.wait({head.task})
            self._pop_call()
            try:
                await self._settle(head)
            except Exception as exc:  # a bug must not stop serving everybody else
                log.exception("applying a batch failed; aborting its requests")
                if self.scheduler.inflight and self.scheduler.inflight[0] is head.batch:
                    self.scheduler.discard(head.batch)
                self._broken = True
                self._abort_batch(head.batch, f"internal error: {exc}")
            if not self._calls:
                self._broken = False  # every call after the failed one has settled: plan from what happened

    def _pop_call(self) -> _Call:
        call = self._calls.popleft()
        if not self._calls:
            self.stats.wall_seconds += time.perf_counter() - self._busy_since
        return call

    def _send_ready(self) -> None:
        """Sends calls while the pipeline has room and the scheduler has work."""
        while not self._broken and len(self._calls) < self.pipeline_depth:
            batch = self.scheduler.schedule()
            if batch is None:
                return
            if not self._calls:
                self._busy_since = time.perf_counter()
            request = self._encode(batch)
            self._calls.append(_Call(batch, asyncio.ensure_future(
                self._execute(request, timeout=self.execute_timeout_s, metadata=self.metadata))))

    async def _settle(self, call: _Call) -> None:
        """The oldest call returned: apply its tokens, send the next call, then stream (first tokens before the next
        call); or handle its failure."""
        batch = call.batch
        try:
            response = call.task.result()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in WORKER_LOST:
                await self._recover(call, exc)
                return
            self.scheduler.discard(batch)
            if self._broken:  # planned on a call that failed before it: its failure is that one's
                return
            self._broken = True
            if exc.code() == grpc.StatusCode.ABORTED:  # out of order: nothing ran; plan it again with token ids
                log.warning("worker refused call %d: %s", batch.call_index, exc.details())
                self.stats.refused_calls += 1
            else:  # about this batch (a bug, a device failure): its requests are aborted, serving goes on
                log.error("worker call failed (%s: %s); aborting its requests", exc.code().name, exc.details())
                self._abort_batch(batch, exc.details())
            return
        if self._broken:  # a call before this one failed: this one was planned on results that never came
            self.scheduler.discard(batch)
            return
        self.stats.calls += 1
        self.stats.worker_seconds += response.device_seconds
        sampled = np.frombuffer(response.token_ids, dtype=np.int32).reshape(batch.rows, batch.num_steps)
        logprobs = (np.frombuffer(response.logprobs, dtype=np.float32).reshape(batch.rows, batch.num_steps, -1)
                    if batch.logprobs and response.logprobs else None)
        prompt_logprobs = (np.frombuffer(response.prompt_logprobs, dtype=np.float32)
                           .reshape(batch.rows, batch.tokens, -1)
                           if batch.prompt_logprobs and response.prompt_logprobs else None)
        updates = self.scheduler.postprocess(batch, sampled, logprobs, prompt_logprobs)
        if batch.is_prefill:  # first tokens: their streams send them before the next call is planned and sent
            self._feed(updates)
            await asyncio.sleep(0)
            self._send_ready()
        else:  # the worker gets its next call before the streams are fed
            self._send_ready()
            self._feed(updates)

    def _feed(self, updates) -> None:
        """Puts each sequence's new tokens in its stream's outbox; its stream sends them when the loop next turns."""
        for seq, delta in updates:
            self.stats.tokens += len(delta.token_ids)
            seq.outbox.put_nowait(delta)
            if seq.finish:
                self._finish(seq)
            elif seq.outbox.qsize() > self.stream_buffer:
                self.abort(seq, f"the client read too slowly: {self.stream_buffer} messages were waiting for it "
                                "(--max-stream-buffer)")

    def _abort_batch(self, batch: ScheduledBatch, reason: str) -> None:
        for seq in batch.seqs:
            if not seq.finish:
                seq.outbox.put_nowait(seq.abort(reason))
            self._finish(seq)

    def _encode(self, batch: ScheduledBatch) -> bytes:
        return encode_batch(batch, self.info.block_table_width, self.info.instance_id)

    async def _recover(self, failed: _Call, exc: grpc.aio.AioRpcError) -> None:
        """The worker failed mid-call: recompute every running sequence, on the same or a restarted worker. The
        calls sent after the failed one are awaited and their results dropped: they built on it."""
        log.error("worker call failed (%s: %s); recomputing %d running sequences", exc.code().name,
                  exc.details(), len(self.scheduler.running))
        self.scheduler.discard(failed.batch)
        while self._calls:
            later = self._pop_call()
            try:
                await later.task
            except Exception:
                pass
            self.scheduler.discard(later.batch)
        self.scheduler.preempt_all()
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        self._recovering = True
        try:
            info = await self._fetch_worker_info(
                timeout_s=max(0.0, self._lost_since + self.worker_timeout_s - time.monotonic()))
        except grpc.aio.AioRpcError as lost:
            # nobody waits forever: the streams end with a reason, new requests get UNAVAILABLE until it is back
            self.abort_all(f"the worker has been unavailable for {self.worker_timeout_s:g} s (--worker-timeout; "
                           f"last error {lost.code().name}); retry later")
            log.error("worker %s gone for %.0f s: requests aborted, new ones refused until it returns",
                      self.worker_address, self.worker_timeout_s)
            info = await self._fetch_worker_info(timeout_s=float("inf"))
        finally:
            self._recovering = False
        self._lost_since = None
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

    def stats_proto(self) -> scheduler_pb2.EngineStats:
        """Every cumulative counter, read where it is kept: GetServerInfo and /metrics both report this."""
        s = self.stats
        return scheduler_pb2.EngineStats(
            worker_calls=s.calls, worker_call_seconds=s.wall_seconds, worker_busy_seconds=s.worker_seconds,
            generated_tokens=s.tokens, preemptions=self.scheduler.num_preemptions, worker_restarts=self.restarts,
            prompt_tokens=s.prompt_tokens, prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits, finished_requests=s.finished,
            prefix_cache_evictions=self.blocks.evictions)


# a padding row's sampling record: greedy, no filters, no penalties
PADDING_ROW = Sampling(temperature=0.0, seed=0).row
_PADDING_WORDS = np.frombuffer(PADDING_ROW, np.uint32)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_BLOCK_IDS = attrgetter("blocks.block_ids")
# the block tables' field key (protobuf wire type 2: length-delimited)
_TABLES_KEY = _varint(worker_pb2.ExecuteRequest.DESCRIPTOR.fields_by_name["block_tables"].number << 3 | 2)


def encode_batch(batch: ScheduledBatch, table_width: int, instance_id: str) -> bytes:
    """The serialized ExecuteRequest of a planned batch, padded to its bucket: padding rows have chunk_len 0 and
    a table of null blocks. Column by column (one NumPy conversion per array, not one assignment per row and
    field); the sampling columns come from each sequence's packed record (Sampling.row).

    The block tables (rows x width int32, 256 KB at 256 rows) are the request's largest field by far: they are
    appended to the other fields' serialization as one length-delimited field (protobuf's wire format: a message
    followed by a field is the message with that field) instead of being copied into the message and serialized
    again, which cost about 0.1-0.3 ms per call on the 2-core machine."""
    B, T, n = batch.rows, batch.tokens, len(batch.seqs)
    seqs = batch.seqs

    def column(values, dtype, fill=0) -> bytes:
        out = np.full(B, fill, dtype)
        out[:n] = values
        return out.tobytes()

    tokens = np.zeros((B, T), np.int32)
    if batch.is_prefill:
        for i, inputs in enumerate(batch.inputs):
            tokens[i, :len(inputs)] = inputs
    else:
        tokens[:n, 0] = batch.inputs
    # the sampling columns, one row of 32-bit words per ROW_DTYPE field
    columns = np.empty((len(ROW_DTYPE.names), B), np.uint32)
    columns[:, :n] = batch.sampling.T
    columns[:, n:] = _PADDING_WORDS[:, None]
    rows = {name: columns[i] for i, name in enumerate(ROW_DTYPE.names)}
    # the block table's one home is the sequence's block list: each call's rows are built from it here
    tables = np.zeros(B * table_width, np.int32)
    if n:
        block_lists, lengths = batch.block_lists, batch.num_blocks
        if block_lists is None:
            block_lists = list(map(_BLOCK_IDS, seqs))
            lengths = np.fromiter(map(len, block_lists), np.int64, n)
        ids = np.frombuffer(b"".join(block_lists), np.int32)
        starts = np.cumsum(lengths) - lengths  # of each row's ids in `ids`
        tables[np.arange(len(ids)) + np.repeat(np.arange(n) * table_width - starts, lengths)] = ids
    fed = (np.asarray(batch.prev_rows) >= 0).any()
    request = worker_pb2.ExecuteRequest(
        rows=B, tokens=T, num_steps=batch.num_steps, token_ids=tokens.tobytes(),
        positions=column(batch.positions, np.int32), chunk_lens=column(batch.chunk_lens if T > 1 else 1, np.int32),
        temperature=rows["temperature"].tobytes(), top_p=rows["top_p"].tobytes(),
        top_k=rows["top_k"].tobytes(), seeds=rows["seed"].tobytes(), seeds_high=rows["seed_high"].tobytes(),
        counters=column(batch.counters, np.uint32),
        instance_id=instance_id, call_index=batch.call_index, previous_call=batch.previous_call,
        previous_rows=column(batch.prev_rows, np.int32, -1) if fed else b"", logprobs=batch.logprobs,
        prompt_logprobs=batch.prompt_logprobs)
    if np.any(batch.slots) or rows["min_p"].any():  # the full graph's inputs; the plain graph needs none of them
        request.slots, request.min_p = column(batch.slots, np.int32), rows["min_p"].tobytes()
        request.repetition_penalty = rows["repetition_penalty"].tobytes()
        request.presence_penalty = rows["presence_penalty"].tobytes()
        request.frequency_penalty = rows["frequency_penalty"].tobytes()
    for seq in batch.slot_inits:
        s = seq.sampling
        request.slot_inits.add(
            slot=seq.slot, prompt_ids=np.asarray(seq.prompt_ids, np.int32).tobytes(),
            output_ids=np.asarray(seq.output_ids, np.int32).tobytes(),
            bias_ids=np.asarray(s.logit_bias[0], np.int32).tobytes(),
            bias_values=np.asarray(s.logit_bias[1], np.float32).tobytes(),
            allowed_ids=np.asarray(s.allowed_token_ids, np.int32).tobytes(), min_tokens=s.min_tokens,
            stop_ids=np.asarray(sorted(seq.end_ids), np.int32).tobytes())
    return b"".join((request.SerializeToString(), _TABLES_KEY, _varint(tables.nbytes), tables.data))
