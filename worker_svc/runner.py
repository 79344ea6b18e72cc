"""Runs fixed-shape batches: TinyJit graphs per (rows, tokens) bucket, captured at warm-up and replayed.

A decode call may run several steps back to back on the device, feeding each step's sampled tokens into the
next, so the gRPC round trip and the host work are paid once per call rather than once per token. A call's row may
also take its input token from the last token the previous call sampled for some row (`Batch.prev_rows`): the
scheduler can then send the next call before it has seen the previous one's result, and the worker never waits.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes
from tinygrad.uop.ops import KernelInfo, Ops

from worker_svc import compat, readback
from worker_svc.kv_cache import NULL_BLOCK
from worker_svc.model import LlamaModel
from worker_svc.sampling import NUM_LOGPROBS, PROMPT_FLAG, STOP_FLAG, apply_bias_and_penalties, sample, token_logprobs

# columns of the per-row metadata buffer that goes to the device in one copy, before the block table
(POS, CHUNK_LEN, TEMPERATURE, TOP_P, TOP_K, SEED, COUNTER, SLOT, MIN_P, REPETITION, PRESENCE, FREQUENCY,
 SEED_HIGH) = range(13)
META_COLS = 13
LOGPROB_COLS = 2 + 2 * NUM_LOGPROBS  # per row and step: chosen logprob, rank, top ids, top logprobs


def _count_kernel(counts: UOp, slots: UOp, tokens: UOp) -> UOp:
    """counts[slots[i], tokens[i]] += 1 for every row i: touches one entry per row, not the whole buffer. Rows
    without a slot name slot 0, a scratch row nobody reads with a penalty on (their races there are harmless)."""
    i = UOp.range(slots.shape[0], 0)
    s = slots[i].cast(dtypes.weakint).maximum(0).minimum(counts.shape[0] - 1)
    t = tokens[i].cast(dtypes.weakint).maximum(0).minimum(counts.shape[1] - 1)
    return counts[s, t].store(counts[s, t] + 1).end(i).sink(arg=KernelInfo(name="count_tokens", opts_to_apply=()))


def _write_slot_kernel(counts: UOp, bias: UOp, min_tokens: UOp, slot: UOp, count_row: UOp, bias_row: UOp,
                       min_row: UOp) -> UOp:
    """counts[slot[0]] = count_row, bias[slot[0]] = bias_row, min_tokens[slot[0]] = min_row[0]: the slot index is
    read from a buffer, so one kernel (compiled at warm-up) serves every slot. As a setitem with a Python index it
    was a new kernel, compiled at first use in a serving thread, for every slot."""
    v = UOp.range(counts.shape[1], 0)
    s = slot[0].cast(dtypes.weakint).maximum(0).minimum(counts.shape[0] - 1)
    stores = UOp.group(counts[s, v].store(count_row[v]), bias[s, v].store(bias_row[v]),
                       min_tokens[s.valid(v.eq(0))].store(min_row[0]))
    return stores.end(v).sink(arg=KernelInfo(name="write_slot", opts_to_apply=()))


@dataclass
class SlotInit:
    """What a sampling slot holds for the sequence the scheduler gives it: the counts of its tokens so far (the
    penalties' state, which the graphs then update themselves) and its logit bias, with -inf outside
    allowed_ids when that is not empty. The scheduler sends it when it assigns the slot, and again after a
    worker restart: it is the source of truth."""

    slot: int
    prompt_ids: np.ndarray
    output_ids: np.ndarray
    bias_ids: np.ndarray
    bias_values: np.ndarray
    allowed_ids: np.ndarray
    min_tokens: int = 0  # stop_ids are not sampled before the sequence has this many output tokens
    stop_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))


def without_device_graphs(linear: UOp) -> UOp:
    """A captured linear with each device graph replaced by the calls it batches, in order."""
    calls = []
    for call in linear.src:
        ast = call.src[0]
        calls.extend(ast.src[0].src if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph" else (call,))
    return linear.replace(src=tuple(calls))


class BatchError(ValueError):
    """A batch the worker refuses: its shapes are not a captured bucket's, or its values are out of range."""


@dataclass
class Batch:
    """Host arrays of one call, already padded by the scheduler to a bucket's shape.

    token_ids (B, T); per row: positions of the first token, chunk_lens (valid tokens, 0 for a padding row),
    sampling parameters, counters (tokens the row has sampled so far, for seeded reproducibility);
    block_tables (B, W) with W = the worker's fixed table width; num_steps decode steps to run (T == 1);
    prev_rows (B,) or None: per row, the row of the previous call whose last sampled token is this row's input
    (its token_ids entry is ignored), -1 to use token_ids (decode only)."""

    token_ids: np.ndarray
    positions: np.ndarray
    chunk_lens: np.ndarray
    block_tables: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seeds: np.ndarray
    counters: np.ndarray
    num_steps: int = 1
    prev_rows: np.ndarray | None = None
    # the rest of vLLM's sampling parameters, per row (None: off for every row); slots (0: none) name the
    # sampling slot whose counts and bias the row uses and whose counts its sampled tokens update
    slots: np.ndarray | None = None
    min_p: np.ndarray | None = None
    repetition_penalty: np.ndarray | None = None
    presence_penalty: np.ndarray | None = None
    frequency_penalty: np.ndarray | None = None
    logprobs: bool = False  # read back each sampled token's logprob, rank and top NUM_LOGPROBS alternatives
    slot_inits: list[SlotInit] = field(default_factory=list)  # applied before the call runs

    seeds_high: np.ndarray | None = None  # (B,) uint32 high halves of the 64-bit seeds; None: all 0
    # prefill only: also read back every position's logprob of the row's next token (token_ids[i, j + 1]) and the
    # top NUM_LOGPROBS alternatives, from a graph of its own (`ModelRunner.prompt_graph`)
    prompt_logprobs: bool = False

    @property
    def uses_extras(self) -> bool:
        """Whether any row needs the full sampling graph's penalties, bias, min_p or logprobs."""
        return bool(self.logprobs or self.slot_inits
                    or (self.slots is not None and (self.slots > 0).any())
                    or (self.min_p is not None and (self.min_p > 0).any()))


class CallResult(NamedTuple):
    """What one call reads back: sampled ids (B, num_steps); if asked, their logprobs (B, num_steps, LOGPROB_COLS)
    and the prompt logprobs of every position (B, T, LOGPROB_COLS)."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None


class ModelRunner:
    def __init__(self, model: LlamaModel, decode_batch_sizes: list[int], prefill_shapes: list[tuple[int, int]],
                 max_steps: int = 8):
        compat.apply_for(model.weights.embed.device)
        self.model = model
        self.block_size = model.cache.block_size
        self.table_width = model.max_blocks_per_seq
        self.max_steps = max_steps
        self.decode_batch_sizes = sorted(set(decode_batch_sizes))
        self.prefill_shapes = sorted(set(prefill_shapes), key=lambda s: (s[1], s[0]))
        self.buckets = [(b, 1) for b in self.decode_batch_sizes] + [s for s in self.prefill_shapes if s[1] > 1]
        if not any(t > 1 for _, t in self.prefill_shapes) or not self.decode_batch_sizes:
            raise ValueError("need at least one decode batch size and one prefill shape of more than one token")
        # two graphs per bucket: with the top-k/top-p search, and without it for batches that need none
        self._jits: dict[tuple[int, int, bool], TinyJit] = {
            (*shape, filters): TinyJit(functools.partial(self._step, filters=filters))
            for shape in self.buckets for filters in (False, True)}
        # the tokens sampled at each step of a call, row by row, one buffer for every bucket: read back once per
        # call, and read by the graphs themselves as the next step's input and as the first input of rows that
        # continue a row of the previous call (of any bucket), so neither multi-step decode nor a pipelined
        # next call waits on the host
        self.max_rows = max(b for b, _ in self.buckets)
        self._sampled = Tensor.zeros(self.max_rows, max_steps, dtype=dtypes.int32).contiguous().realize()
        self._last_call: tuple[int, int] | None = None  # (rows, num_steps) of the last call; None: unknown
        self.last_logprobs: np.ndarray | None = None  # (B, num_steps, LOGPROB_COLS) of the last call, if asked
        self.last_prompt_logprobs: np.ndarray | None = None  # (B, T, LOGPROB_COLS) of the last call, if asked
        # per prefill bucket, the graph that also computes every position's prompt logprobs, and its output buffer
        # (rows: the largest prefill bucket's B * T): made and captured on first use (`prompt_graph`)
        self._prompt_jits: dict[tuple[int, int], TinyJit] = {}
        self._prompt_logprobs: Tensor | None = None
        # per bucket, the call's two host-to-device copies (token ids, packed metadata) as a captured graph too:
        # copied eagerly, each took milliseconds of tinygrad scheduling on the host (10 ms a call on the 2-core
        # CPU machine), which decided what a short, pipelined call costs
        self._uploads: dict[tuple[int, int], TinyJit] = {shape: TinyJit(self._upload) for shape in self.buckets}
        # ... from host arrays kept per bucket, which tinygrad's NPY device wraps without a copy: each call writes
        # its inputs there instead of wrapping new arrays
        self._host: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, Tensor, Tensor]] = {}
        self._step_var = UOp.variable("step", 0, max_steps - 1)
        # sampling slots (0: scratch), one per sequence that may run at once, plus the per-step logprobs output
        V = model.config.vocab_size
        self.num_slots = self.decode_batch_sizes[-1] + 1
        self._counts = Tensor.zeros(self.num_slots, V, dtype=dtypes.int32).contiguous().realize()
        self._bias = Tensor.zeros(self.num_slots, V, dtype=dtypes.float32).contiguous().realize()
        self._min_tokens = Tensor.zeros(self.num_slots, dtype=dtypes.int32).contiguous().realize()
        # a slot's rows are written by one captured kernel from host arrays that tinygrad's NPY device wraps
        self._slot_host = (np.zeros(1, np.int32), np.zeros(V, np.int32), np.zeros(V, np.float32),
                           np.zeros(1, np.int32))
        self._slot_inputs = [Tensor(a, device="NPY") for a in self._slot_host]
        self._write_slot = TinyJit(self._write_slot_graph)
        self._logprobs = Tensor.zeros(self.max_rows, max_steps, LOGPROB_COLS).contiguous().realize()
        self._blocks_var = UOp.variable("num_blocks", 1, self.table_width)
        self._readback = readback.for_device(model.weights.embed.device)

    # ---- the captured computation ----------------------------------------------------------------------------
    def _step(self, tokens: Tensor, meta: Tensor, step: UOp, num_blocks: UOp, filters: bool,
              prompt_logprobs: bool = False) -> Tensor:
        """One forward + sample for every row; `step` offsets positions and RNG counters inside multi-step calls.

        Decode step 0 reads `tokens`, where a negative id -1 - i names entry i of the flattened sampled buffer (a
        row of the previous call at its last step); step s > 0 reads the tokens sampled at step s - 1. `filters`
        (fixed per graph) includes the top-k/top-p search and the rest of vLLM's sampling parameters: logit bias,
        allowed ids, repetition/presence/frequency penalties from the slots' counts (updated here with the sampled
        tokens), min_p, and every row's logprobs (written to the logprobs buffer).

        `prompt_logprobs` (prefill, with filters; a graph of its own) also writes, for every position j of every
        row, the logprob and rank of the row's next token tokens[i, j + 1] and the top alternatives there
        (`token_logprobs` over B * T rows of logits instead of B) to the prompt logprobs buffer."""
        B, T = tokens.shape
        inputs = tokens
        sampled = self._sampled
        if T == 1:
            tokens = self._decode_inputs(tokens, step)
        bs, W = self.block_size, self.table_width
        tables = meta[:, META_COLS:]
        offsets = Tensor.arange(T).reshape(1, T)
        positions = meta[:, POS].reshape(B, 1) + offsets + step
        in_chunk = offsets < meta[:, CHUNK_LEN].reshape(B, 1)
        writable = in_chunk & (positions < W * bs)
        positions = positions.clip(0, self.model.max_context - 1)
        blocks = tables.gather(1, (positions // bs).clip(0, W - 1))
        slots = writable.where(blocks * bs + positions % bs, NULL_BLOCK * bs).cast(dtypes.int32)
        last = (meta[:, CHUNK_LEN] - 1).maximum(0)
        hidden = None
        # attention reads the block tables in place in the packed metadata (a slice of it would be a copy kernel)
        if prompt_logprobs:  # the last positions' logits as in the other graphs, every position's from the same states
            hidden = self.model.hidden_states(tokens, positions.cast(dtypes.int32), slots, meta, num_blocks, META_COLS)
            logits = self.model.last_logits(hidden.realize(), last)
        else:
            logits = self.model.logits(tokens, positions.cast(dtypes.int32), slots, meta, num_blocks, last, META_COLS)
        # scheduled on its own: the forward pass is the same in both graphs of a bucket, so the second one's
        # capture reuses the first one's schedule (tinygrad's schedule cache) and schedules only its sampling
        logits = logits.realize()
        f32 = lambda col: meta[:, col].bitcast(dtypes.float32)  # noqa: E731
        processed, min_p = logits, None
        if filters:
            slot = meta[:, SLOT].clip(0, self.num_slots - 1)
            too_early = (meta[:, COUNTER] + step) < self._min_tokens[slot]  # min_tokens: no stop id yet
            processed = apply_bias_and_penalties(logits, self._counts[slot], self._bias[slot], f32(REPETITION),
                                                 f32(PRESENCE), f32(FREQUENCY), too_early)
            min_p = f32(MIN_P)
        next_tokens = sample(processed, f32(TEMPERATURE), meta[:, TOP_K], f32(TOP_P),
                             meta[:, SEED].bitcast(dtypes.uint32), (meta[:, COUNTER] + step).bitcast(dtypes.uint32),
                             filters=filters, min_p=min_p,
                             seeds_high=meta[:, SEED_HIGH].bitcast(dtypes.uint32))
        store = sampled.uop.shrink(((0, B), (step, step + 1))).store(next_tokens.reshape(B, 1).uop)
        if not filters:
            return Tensor(sampled.uop.after(store))
        lp = token_logprobs(logits, next_tokens).reshape(B, 1, LOGPROB_COLS)
        lp_store = self._logprobs.uop.shrink(((0, B), (step, step + 1), (0, LOGPROB_COLS))).store(lp.uop)
        counted = self._counts.custom_kernel(slot, next_tokens, fxn=_count_kernel)[0]
        if hidden is None:
            return Tensor(sampled.uop.after(store, lp_store, counted.uop))
        every = self.model.all_logits(hidden).reshape(B * T, -1)
        targets = inputs[:, 1:].pad(((0, 0), (0, 1))).reshape(B * T)  # position j's next token: j + 1's input
        prompt_lp = token_logprobs(every, targets)
        plp_store = self._prompt_logprobs.uop.shrink(((0, B * T), (0, LOGPROB_COLS))).store(prompt_lp.uop)
        return Tensor(sampled.uop.after(store, lp_store, counted.uop, plp_store))

    def _upload(self, *host: Tensor) -> tuple[Tensor, ...]:
        """Host (NPY) tensors copied to the device: the body of the captured upload graphs."""
        device = self.model.weights.embed.device
        return tuple(t.to(device).contiguous() for t in host)

    def _decode_inputs(self, tokens: Tensor, step: UOp) -> Tensor:
        """(B, 1) input tokens of a decode step, gathered on the device from the sampled buffer where they were
        sampled there: by the previous step of this call, or (step 0, negative id) by the previous call. A gather
        over the small (max_rows * max_steps) buffer, the same graph whatever the previous call's bucket."""
        B = tokens.shape[0]
        R, S = self._sampled.shape
        first = tokens.reshape(B)
        at_start = Tensor(step) == 0
        index = at_start.where(-1 - first, Tensor.arange(B, dtype=dtypes.int32) * S + (Tensor(step) - 1))
        fed = self._sampled.reshape(R * S).gather(0, index.clip(0, R * S - 1))
        return (at_start.logical_not() | (first < 0)).where(fed, first).reshape(B, 1)

    # ---- host side -------------------------------------------------------------------------------------------
    def check_bucket(self, rows: int, tokens: int) -> None:
        if (rows, tokens) not in self.buckets:
            raise BatchError(f"batch shape {(rows, tokens)} is not a bucket; buckets are {self.buckets}")

    def validate(self, batch: Batch) -> tuple[int, int]:
        """Refuse anything a captured graph would silently misread (TinyJit does not check input shapes)."""
        if batch.token_ids.ndim != 2:
            raise BatchError("token_ids must be 2-D (rows, tokens)")
        B, T = batch.token_ids.shape
        self.check_bucket(B, T)
        for name in ("positions", "chunk_lens", "temperature", "top_p", "top_k", "seeds", "counters"):
            if getattr(batch, name).shape != (B,):
                raise BatchError(f"{name} must have one entry per row ({B}), got shape {getattr(batch, name).shape}")
        if batch.block_tables.shape != (B, self.table_width):
            raise BatchError(f"block_tables must be ({B}, {self.table_width}), got {batch.block_tables.shape}")
        if not 1 <= batch.num_steps <= self.max_steps:
            raise BatchError(f"num_steps must be in [1, {self.max_steps}]")
        if batch.num_steps > 1 and T != 1:
            raise BatchError("multi-step calls are decode only (one token per row)")
        if batch.prompt_logprobs and T == 1:
            raise BatchError("prompt_logprobs: prefill calls only (more than one token per row)")
        if (batch.chunk_lens < 0).any() or (batch.chunk_lens > T).any():
            raise BatchError(f"chunk_lens must be in [0, {T}]")
        if (batch.positions < 0).any() or (batch.positions + batch.chunk_lens > self.model.max_context).any():
            raise BatchError(f"positions + chunk_lens must stay within the context of {self.model.max_context}")
        if (batch.block_tables < 0).any() or (batch.block_tables >= self.model.cache.num_blocks).any():
            raise BatchError(f"block ids must be in [0, {self.model.cache.num_blocks})")
        vocab = self.model.config.vocab_size
        if (batch.token_ids < 0).any() or (batch.token_ids >= vocab).any():
            raise BatchError(f"token ids must be in [0, {vocab})")
        # sampling values the graph would turn into NaN or a wrong filter instead of an error
        if not (np.isfinite(batch.temperature) & (batch.temperature >= 0)).all():
            raise BatchError("temperature must be finite and >= 0")
        if not ((batch.top_p > 0) & (batch.top_p <= 1)).all():
            raise BatchError("top_p must be in (0, 1]")
        if (batch.top_k < 0).any():
            raise BatchError("top_k must be >= 0 (0: off)")
        for name in ("slots", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seeds_high"):
            value = getattr(batch, name)
            if value is not None and value.shape != (B,):
                raise BatchError(f"{name} must have one entry per row ({B}), got shape {value.shape}")
        if batch.slots is not None and ((batch.slots < 0) | (batch.slots >= self.num_slots)).any():
            raise BatchError(f"slots must be in [0, {self.num_slots})")
        if batch.min_p is not None and not ((batch.min_p >= 0) & (batch.min_p <= 1)).all():
            raise BatchError("min_p must be in [0, 1]")
        if batch.repetition_penalty is not None and not (np.isfinite(batch.repetition_penalty)
                                                         & (batch.repetition_penalty > 0)).all():
            raise BatchError("repetition_penalty must be finite and > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(batch, name)
            if value is not None and not np.isfinite(value).all():
                raise BatchError(f"{name} must be finite")
        for init in batch.slot_inits:
            if not 1 <= init.slot < self.num_slots:
                raise BatchError(f"slot_inits: slot must be in [1, {self.num_slots})")
            if init.min_tokens >= 2 ** 31:
                raise BatchError("slot_inits: min_tokens must be below 2**31")
            for name in ("prompt_ids", "output_ids", "bias_ids", "allowed_ids", "stop_ids"):
                ids = getattr(init, name)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                    raise BatchError(f"slot_inits: {name} must be in [0, {vocab})")
            if init.bias_values.shape != init.bias_ids.shape or not np.isfinite(init.bias_values).all():
                raise BatchError("slot_inits: bias_values must be finite, one per bias id")
        if batch.prev_rows is not None:
            if batch.prev_rows.shape != (B,):
                raise BatchError(f"prev_rows must have one entry per row ({B}), got shape {batch.prev_rows.shape}")
            if (batch.prev_rows >= 0).any():
                if T != 1:
                    raise BatchError("only decode rows (one token per row) can continue a row of the previous call")
                if self._last_call is None:
                    raise BatchError("prev_rows name rows of a previous call, but the last call did not complete")
                rows = self._last_call[0]
                if (batch.prev_rows < -1).any() or (batch.prev_rows >= rows).any():
                    raise BatchError(f"prev_rows must be -1 or a row of the previous call, in [0, {rows})")
        return B, T

    def _pack_meta(self, batch: Batch) -> np.ndarray:
        B = batch.token_ids.shape[0]
        meta = np.empty((B, META_COLS + self.table_width), dtype=np.int32)
        meta[:, POS] = batch.positions
        meta[:, CHUNK_LEN] = batch.chunk_lens
        meta[:, TEMPERATURE] = batch.temperature.astype(np.float32).view(np.int32)
        meta[:, TOP_P] = batch.top_p.astype(np.float32).view(np.int32)
        meta[:, TOP_K] = batch.top_k
        meta[:, SEED] = batch.seeds.astype(np.uint32).view(np.int32)
        meta[:, COUNTER] = batch.counters.astype(np.uint32).view(np.int32)
        meta[:, SLOT] = 0 if batch.slots is None else batch.slots
        for col, value, default in ((MIN_P, batch.min_p, 0.0), (REPETITION, batch.repetition_penalty, 1.0),
                                    (PRESENCE, batch.presence_penalty, 0.0),
                                    (FREQUENCY, batch.frequency_penalty, 0.0)):
            meta[:, col] = (np.full(B, default, np.float32) if value is None
                            else value.astype(np.float32)).view(np.int32)
        meta[:, SEED_HIGH] = 0 if batch.seeds_high is None else batch.seeds_high.astype(np.uint32).view(np.int32)
        meta[:, META_COLS:] = batch.block_tables
        return meta

    def blocks_to_read(self, batch: Batch) -> int:
        """Attention reads only as many table entries as the longest row needs by the call's last step."""
        end = int((batch.positions + batch.chunk_lens).max()) + batch.num_steps - 1
        return min(max(1, math.ceil(end / self.block_size)), self.table_width)

    def graph_key(self, batch: Batch) -> tuple[int, int, bool]:
        """(rows, tokens, filters) of the graph that runs a valid batch: the one without the top-k/top-p search and
        the other sampling parameters unless a row asks for them."""
        B, T = self.validate(batch)
        return B, T, bool(((batch.top_k > 0) | (batch.top_p < 1.0)).any() or batch.uses_extras)

    def prompt_graph(self, B: int, T: int) -> TinyJit:
        """The prefill bucket's graph with prompt logprobs (full sampling, plus every position's logits and their
        top alternatives), made and captured by its first call: few servers ever run one, and the other graphs
        stay as they are, so start-up and every other call cost what they did."""
        jit = self._prompt_jits.get((B, T))
        if jit is None:
            if self._prompt_logprobs is None:
                rows = max(b * t for b, t in self.buckets if t > 1)
                self._prompt_logprobs = Tensor.zeros(rows, LOGPROB_COLS).contiguous().realize()
            jit = TinyJit(functools.partial(self._step, filters=True, prompt_logprobs=True))
            compat.capture_on_next_call(jit)
            self._prompt_jits[(B, T)] = jit
        return jit

    def _input_tokens(self, batch: Batch) -> np.ndarray:
        """token_ids with each fed row's first token replaced by -1 - (its flat index in the sampled buffer): the
        previous call left the row's last token at [prev_row, its num_steps - 1]. Same bytes as token_ids, so a
        pipelined call copies no more to the device than any other."""
        tokens = np.ascontiguousarray(batch.token_ids, dtype=np.int32)
        if batch.prev_rows is None or not (fed := batch.prev_rows >= 0).any():
            return tokens
        tokens = tokens.copy()
        tokens[fed, 0] = -1 - (batch.prev_rows[fed] * self.max_steps + self._last_call[1] - 1)
        return tokens

    def _upload_inputs(self, batch: Batch, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The call's token ids and packed metadata on the device, copied by the bucket's upload graph."""
        if shape not in self._host:
            host_tokens = np.zeros(shape, np.int32)
            host_meta = np.zeros((shape[0], META_COLS + self.table_width), np.int32)
            self._host[shape] = (host_tokens, host_meta, Tensor(host_tokens, device="NPY"),
                                 Tensor(host_meta, device="NPY"))
        host_tokens, host_meta, tokens, meta = self._host[shape]
        np.copyto(host_tokens, self._input_tokens(batch))
        np.copyto(host_meta, self._pack_meta(batch))
        return compat.replay(self._uploads[shape], tokens, meta)

    def launch(self, batch: Batch) -> Callable[[], CallResult]:
        """Runs the batch's steps on the device and queues their read-back; returns a function that waits for the
        results (CallResult). Call it after releasing the device to other callers: the next call can be launched
        while this one runs (worker_svc/readback.py). Two host-to-device copies and one to three copies back per
        call."""
        key = self.graph_key(batch)
        jit = self.prompt_graph(*key[:2]) if batch.prompt_logprobs else self._jits[key]
        self._init_slots(batch.slot_inits)
        tokens, meta = self._upload_inputs(batch, key[:2])
        num_blocks = self._blocks_var.bind(self.blocks_to_read(batch))
        self._last_call = None  # a call that fails part-way leaves the sampled buffer in no known state
        for s in range(batch.num_steps):
            compat.replay(jit, tokens, meta, self._step_var.bind(s), num_blocks)
        # queued behind the steps, before anything launched later can overwrite the shared buffers
        B, steps, S = batch.token_ids.shape[0], batch.num_steps, self.max_steps
        wait_tokens = self._readback.start(self._sampled, B * S)
        wait_logprobs = self._readback.start(self._logprobs, B * S * LOGPROB_COLS) if batch.logprobs else None
        T = batch.token_ids.shape[1]
        wait_prompt = (self._readback.start(self._prompt_logprobs, B * T * LOGPROB_COLS) if batch.prompt_logprobs
                       else None)
        self._last_call = (B, steps)

        def result() -> CallResult:
            sampled = wait_tokens().reshape(B, S)[:, :steps]
            logprobs = None if wait_logprobs is None else wait_logprobs().reshape(B, S, LOGPROB_COLS)[:, :steps]
            prompt = None if wait_prompt is None else wait_prompt().reshape(B, T, LOGPROB_COLS)
            return CallResult(sampled, logprobs, prompt)
        return result

    def execute(self, batch: Batch) -> np.ndarray:
        """launch() and wait: the sampled token ids (B, num_steps); the logprobs and prompt logprobs, if asked, in
        last_logprobs and last_prompt_logprobs."""
        self.last_logprobs = self.last_prompt_logprobs = None
        tokens, self.last_logprobs, self.last_prompt_logprobs = self.launch(batch)()
        return tokens

    def _init_slots(self, inits: list[SlotInit]) -> None:
        """Writes each slot's counts, bias and min_tokens (once per sequence admission), through the captured
        slot writer, before the call's steps."""
        slot, counts, bias, min_tokens = self._slot_host
        for init in inits:
            slot[0], min_tokens[0] = init.slot, init.min_tokens
            counts[:] = 0
            counts[np.unique(init.prompt_ids)] += PROMPT_FLAG
            counts[np.unique(init.stop_ids)] += STOP_FLAG
            np.add.at(counts, init.output_ids, 1)
            bias[:] = 0.0
            if init.allowed_ids.size:
                bias[:] = -np.inf
                bias[init.allowed_ids] = 0.0
            bias[init.bias_ids] += init.bias_values
            self._write_slot(*self._slot_inputs)  # copies the host rows now; the write runs before the next call

    def _write_slot_graph(self, slot: Tensor, counts: Tensor, bias: Tensor, min_tokens: Tensor) -> Tensor:
        ins = self._upload(slot, counts, bias, min_tokens)
        return self._counts.custom_kernel(self._bias, self._min_tokens, *ins, fxn=_write_slot_kernel)[0]

    def slot_state(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts, bias) rows of a slot, for tests."""
        return self._counts[slot].numpy(), self._bias[slot].numpy()

    def captured(self) -> dict[tuple[int, int, bool], object]:
        """The captured graph of every (rows, tokens, filters) variant; None where not yet captured."""
        return {key: jit.captured for key, jit in self._jits.items()}

    def kernels_per_step(self, rows: int, tokens: int, filters: bool, prompt_logprobs: bool = False) -> int:
        """Kernels one replay launches (members of a device graph counted one by one)."""
        jit = self._prompt_jits[(rows, tokens)] if prompt_logprobs else self._jits[(rows, tokens, filters)]
        calls = without_device_graphs(jit.captured._linear).src
        return sum(1 for call in calls if call.src[0].op is Ops.PROGRAM)

    def warm_up(self, progress: bool = True) -> None:
        """Capture every bucket's graphs now, so serving compiles nothing."""
        from tqdm import tqdm

        for B, T in tqdm(self.buckets, desc="capturing graphs", unit="bucket", disable=not progress):
            self.capture(B, T)
        empty = np.zeros(0, np.int32)
        compat.capture_on_next_call(self._write_slot)
        for _ in range(2):  # the slot writer too (slot 0 is the scratch slot: rows without a slot of their own)
            self._init_slots([SlotInit(0, empty, empty, empty, np.zeros(0, np.float32), empty)])

    def capture(self, B: int, T: int) -> None:
        """Both graphs of one bucket: captured by the first call (no eager call first), replayed by the second."""
        for filters in (False, True):
            dummy = self.dummy_batch(B, T)
            dummy.top_k[:] = 5 if filters else 0
            dummy.logprobs = filters
            compat.capture_on_next_call(self._jits[(B, T, filters)])
            compat.capture_on_next_call(self._uploads[(B, T)])
            for _ in range(2):
                self.execute(dummy)

    def dummy_batch(self, B: int, T: int, num_steps: int = 1) -> Batch:
        """Padding rows only: every write goes to the null block, nothing real is touched."""
        def zeros(dtype=np.int32) -> np.ndarray:
            return np.zeros(B, dtype=dtype)

        return Batch(token_ids=np.zeros((B, T), np.int32), positions=zeros(), chunk_lens=zeros(),
                     block_tables=np.full((B, self.table_width), NULL_BLOCK, np.int32),
                     temperature=zeros(np.float32), top_p=np.ones(B, np.float32), top_k=zeros(),
                     seeds=zeros(np.uint32), counters=zeros(np.uint32), num_steps=num_steps)
