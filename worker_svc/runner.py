"""Runs fixed-shape batches: TinyJit graphs per (rows, tokens) bucket, captured at warm-up and replayed.

A decode call may run several steps back to back on the device, feeding each step's sampled tokens into the
next, so the gRPC round trip and the host work are paid once per call rather than once per token.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes
from tinygrad.uop.ops import Ops

from worker_svc import compat
from worker_svc.kv_cache import NULL_BLOCK
from worker_svc.model import LlamaModel
from worker_svc.sampling import sample

# columns of the per-row metadata buffer that goes to the device in one copy, before the block table
POS, CHUNK_LEN, TEMPERATURE, TOP_P, TOP_K, SEED, COUNTER = range(7)
META_COLS = 7


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
    block_tables (B, W) with W = the worker's fixed table width; num_steps decode steps to run (T == 1)."""

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
        # per bucket, the tokens sampled at each step of a call: read back once per call, and read by the graph
        # itself as the next step's input, so multi-step decode never waits on the host
        self._sampled = {shape: Tensor.zeros(shape[0], max_steps, dtype=dtypes.int32).contiguous().realize()
                         for shape in self.buckets}
        self._step_var = UOp.variable("step", 0, max_steps - 1)
        self._blocks_var = UOp.variable("num_blocks", 1, self.table_width)

    # ---- the captured computation ----------------------------------------------------------------------------
    def _step(self, tokens: Tensor, meta: Tensor, step: UOp, num_blocks: UOp, filters: bool) -> Tensor:
        """One forward + sample for every row; `step` offsets positions and RNG counters inside multi-step calls.

        Step 0 reads `tokens`; step s > 0 reads the tokens sampled at step s - 1 from the bucket's sampled buffer.
        `filters` (fixed per graph) includes the top-k/top-p search."""
        B, T = tokens.shape
        sampled = self._sampled[(B, T)]
        previous = (sampled * (Tensor.arange(self.max_steps) == Tensor(step) - 1).reshape(1, -1)).sum(1, keepdim=True)
        tokens = (Tensor(step) == 0).where(tokens, previous.cast(dtypes.int32))
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
        logits = self.model.logits(tokens, positions.cast(dtypes.int32), slots, tables, num_blocks, last)
        next_tokens = sample(logits, meta[:, TEMPERATURE].bitcast(dtypes.float32), meta[:, TOP_K],
                             meta[:, TOP_P].bitcast(dtypes.float32), meta[:, SEED].bitcast(dtypes.uint32),
                             (meta[:, COUNTER] + step).bitcast(dtypes.uint32), filters=filters)
        store = sampled.uop.shrink(((0, B), (step, step + 1))).store(next_tokens.reshape(B, 1).uop)
        return Tensor(sampled.uop.after(store))

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
        if (batch.chunk_lens < 0).any() or (batch.chunk_lens > T).any():
            raise BatchError(f"chunk_lens must be in [0, {T}]")
        if (batch.positions < 0).any() or (batch.positions + batch.chunk_lens > self.model.max_context).any():
            raise BatchError(f"positions + chunk_lens must stay within the context of {self.model.max_context}")
        if (batch.block_tables < 0).any() or (batch.block_tables >= self.model.cache.num_blocks).any():
            raise BatchError(f"block ids must be in [0, {self.model.cache.num_blocks})")
        vocab = self.model.config.vocab_size
        if (batch.token_ids < 0).any() or (batch.token_ids >= vocab).any():
            raise BatchError(f"token ids must be in [0, {vocab})")
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
        meta[:, META_COLS:] = batch.block_tables
        return meta

    def blocks_to_read(self, batch: Batch) -> int:
        """Attention reads only as many table entries as the longest row needs by the call's last step."""
        end = int((batch.positions + batch.chunk_lens).max()) + batch.num_steps - 1
        return min(max(1, math.ceil(end / self.block_size)), self.table_width)

    def graph_key(self, batch: Batch) -> tuple[int, int, bool]:
        """(rows, tokens, filters) of the graph that runs a valid batch: the one without the top-k/top-p search
        unless a row asks for it."""
        B, T = self.validate(batch)
        return B, T, bool(((batch.top_k > 0) | (batch.top_p < 1.0)).any())

    def execute(self, batch: Batch) -> np.ndarray:
        """Run the batch; returns the sampled token ids, (B, num_steps) int32. Two host-to-device copies per call."""
        jit = self._jits[self.graph_key(batch)]
        tokens = Tensor(np.ascontiguousarray(batch.token_ids, dtype=np.int32))
        meta = Tensor(self._pack_meta(batch))
        num_blocks = self._blocks_var.bind(self.blocks_to_read(batch))
        for s in range(batch.num_steps):
            sampled = jit(tokens, meta, self._step_var.bind(s), num_blocks)
        return sampled.numpy()[:, :batch.num_steps]

    def captured(self) -> dict[tuple[int, int, bool], object]:
        """The captured graph of every (rows, tokens, filters) variant; None where not yet captured."""
        return {key: jit.captured for key, jit in self._jits.items()}

    def kernels_per_step(self, rows: int, tokens: int, filters: bool) -> int:
        """Kernels one replay launches (members of a device graph counted one by one)."""
        calls = without_device_graphs(self._jits[(rows, tokens, filters)].captured._linear).src
        return sum(1 for call in calls if call.src[0].op is Ops.PROGRAM)

    def warm_up(self, progress: bool = True) -> None:
        """Capture every bucket's graphs now, so serving compiles nothing."""
        from tqdm import tqdm

        for B, T in tqdm(self.buckets, desc="capturing graphs", unit="bucket", disable=not progress):
            self.capture(B, T)

    def capture(self, B: int, T: int) -> None:
        """Both graphs of one bucket (call 1 runs eagerly, call 2 captures)."""
        for filters in (False, True):
            dummy = self.dummy_batch(B, T)
            dummy.top_k[:] = 5 if filters else 0
            for _ in range(3):
                self.execute(dummy)

    def dummy_batch(self, B: int, T: int, num_steps: int = 1) -> Batch:
        """Padding rows only: every write goes to the null block, nothing real is touched."""
        def zeros(dtype=np.int32) -> np.ndarray:
            return np.zeros(B, dtype=dtype)

        return Batch(token_ids=np.zeros((B, T), np.int32), positions=zeros(), chunk_lens=zeros(),
                     block_tables=np.full((B, self.table_width), NULL_BLOCK, np.int32),
                     temperature=zeros(np.float32), top_p=np.ones(B, np.float32), top_k=zeros(),
                     seeds=zeros(np.uint32), counters=zeros(np.uint32), num_steps=num_steps)
