"""Structural invariants that make decode fast: after warm-up nothing compiles, nothing but a step's inputs moves
from host to device, KV writes touch only the new slots, and attention's work follows the real context length."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tinygrad.engine.realize as realize
from tinygrad import Device
from tinygrad.codegen import to_program_cache
from tinygrad.helpers import GlobalCounters
from tinygrad.uop.ops import PatternMatcher

from tests.models import build_model
from worker_svc.runner import META_COLS, Batch, ModelRunner, SlotInit

BLOCK, MAX_CONTEXT, NUM_BLOCKS = 16, 128, 64


@pytest.fixture(scope="module")
def runner(demo_checkpoint) -> ModelRunner:
    model = build_model(demo_checkpoint, NUM_BLOCKS, MAX_CONTEXT, BLOCK)
    r = ModelRunner(model, decode_batch_sizes=[1, 2, 4], prefill_shapes=[(1, 16), (2, 16)], max_steps=4)
    r.warm_up(progress=False)
    return r


def random_batch(r: ModelRunner, rng: np.random.Generator, rows: int, tokens: int, steps: int) -> Batch:
    """Rows with their own blocks, random context lengths and sampling parameters; some rows are padding."""
    W = r.table_width
    used = rng.integers(1, rows + 1)
    chunk = np.where(np.arange(rows) < used, tokens, 0).astype(np.int32)
    if tokens > 1:
        chunk[:used] = rng.integers(1, tokens + 1, size=used)
    positions = np.zeros(rows, np.int32)
    tables = np.zeros((rows, W), np.int32)
    free = list(rng.permutation(np.arange(1, NUM_BLOCKS)))
    for i in range(used):
        positions[i] = rng.integers(0, MAX_CONTEXT - chunk[i] - steps)
        need = -(-(positions[i] + chunk[i] + steps) // BLOCK)
        tables[i, :need] = [free.pop() for _ in range(need)]
    return Batch(token_ids=rng.integers(3, r.model.config.vocab_size, size=(rows, tokens)).astype(np.int32),
                 positions=positions, chunk_lens=chunk, block_tables=tables,
                 temperature=rng.choice([0.0, 0.7, 1.0], size=rows).astype(np.float32),
                 top_p=rng.choice([1.0, 0.9], size=rows).astype(np.float32),
                 top_k=rng.choice([0, 5], size=rows).astype(np.int32),
                 seeds=rng.integers(0, 2 ** 32, size=rows, dtype=np.uint32),
                 counters=rng.integers(0, 100, size=rows).astype(np.uint32), num_steps=steps)


def captured_graphs(r: ModelRunner) -> dict:
    return {key: id(graph) for key, graph in r.captured().items()}


def slot_init(rng: np.random.Generator, num_slots: int) -> SlotInit:
    """A random slot filled with random ids, bias and min_tokens."""
    ids = rng.integers(0, 50, 3).astype(np.int32)
    return SlotInit(int(rng.integers(1, num_slots)), ids, ids[:1], ids[:2], np.ones(2, np.float32), ids[:0],
                    int(rng.integers(0, 100)), ids[:1])


def test_no_compilation_or_capture_after_warm_up(runner):
    rng = np.random.default_rng(0)
    programs, graphs = len(to_program_cache), captured_graphs(runner)
    assert all(g != id(None) for g in graphs.values()) and len(graphs) == 2 * len(runner.buckets)
    for _ in range(50):
        rows, tokens = runner.buckets[rng.integers(len(runner.buckets))]
        steps = int(rng.integers(1, runner.max_steps + 1)) if tokens == 1 else 1
        batch = random_batch(runner, rng, rows, tokens, steps)
        batch.slot_inits = [slot_init(rng, runner.num_slots)]  # any slot, any values: the same writer kernel
        out = runner.execute(batch)
        assert out.shape == (rows, steps)
    assert len(to_program_cache) == programs, "a kernel was compiled after warm-up"
    assert captured_graphs(runner) == graphs, "a graph was captured again after warm-up"


_copies: list[tuple[int, str]] = []


def _record_copy(ctx, call, ast):
    """exec_copy, noting each copy into the compute device (tinygrad's matchers take no closures)."""
    for bufs, _ in realize.unwrap_multi(call, realize.resolve_params(call, ctx.input_uops)):
        if bufs[0].device == Device.DEFAULT and bufs[1].device != Device.DEFAULT:
            _copies.append((bufs[0].nbytes, bufs[1].device))
    return realize.exec_copy(ctx, call, ast)


@contextlib.contextmanager
def host_to_device_copies():
    """Records (bytes, source device) of every copy into the compute device while the block runs."""
    original = realize.pm_exec
    _copies.clear()
    realize.pm_exec = PatternMatcher([(p, _record_copy if f is realize.exec_copy else f) for p, f in original.patterns])
    try:
        yield _copies
    finally:
        realize.pm_exec = original


@pytest.mark.parametrize("rows, tokens, steps", [(4, 1, 4), (1, 1, 1), (2, 16, 1)])
def test_only_the_step_inputs_cross_to_the_device(runner, rows, tokens, steps):
    batch = random_batch(runner, np.random.default_rng(1), rows, tokens, steps)
    runner.execute(batch)  # any lazy first-use work happens here, not in the measured call
    with host_to_device_copies() as copies:
        runner.execute(batch)
    inputs = batch.token_ids.nbytes + rows * (META_COLS + runner.table_width) * 4  # token ids + the packed metadata
    assert sum(n for n, _ in copies) == inputs, copies
    assert len(copies) == 2
    weights = runner.model.weights.nbytes()
    assert inputs < weights / 100


def test_kv_writes_touch_only_the_new_slots(runner):
    rng = np.random.default_rng(2)
    batch = random_batch(runner, rng, rows=2, tokens=1, steps=3)
    pools = [p.numpy().copy() for p in runner.model.cache.pools]
    runner.execute(batch)
    expected = set()
    for i in range(2):
        if batch.chunk_lens[i]:
            for s in range(3):
                pos = batch.positions[i] + s
                expected.add(int(batch.block_tables[i, pos // BLOCK]) * BLOCK + int(pos % BLOCK))
    for before, pool in zip(pools, runner.model.cache.pools):
        changed = set(np.flatnonzero((pool.numpy() != before).any(axis=(0, 2))).tolist())
        assert changed <= expected | set(range(BLOCK))  # the null block absorbs padding rows
        assert changed & expected == expected


def test_attention_work_follows_the_context_length(runner):
    def mem_of(position: int) -> int:
        b = runner.dummy_batch(1, 1)
        b.chunk_lens[:] = 1
        b.positions[:] = position
        b.block_tables[0, :] = np.arange(1, runner.table_width + 1)
        GlobalCounters.reset()
        runner.execute(b)
        return GlobalCounters.global_mem

    short, long = mem_of(5), mem_of(MAX_CONTEXT - 2)
    kv_bytes_per_token = 2 * runner.model.config.num_hidden_layers * runner.model.config.kv_dim * 4
    assert long - short >= (MAX_CONTEXT - 2 - 5 - BLOCK) * kv_bytes_per_token


def test_profile_times_every_kernel_of_a_step_and_restores_the_graph(runner):
    """`make profile` runs a captured step's kernels one by one; it must see all of them and leave the graph as
    it was."""
    from bench.profile import kernel_times

    batch = random_batch(runner, np.random.default_rng(1), 2, 1, 1)
    key = runner.graph_key(batch)
    graph, before = runner.captured()[key], runner.execute(batch)
    times = kernel_times(runner, batch)
    assert len(times) == runner.kernels_per_step(*key)
    assert all(us > 0 for _, us, _ in times)
    assert runner.captured()[key] is graph
    np.testing.assert_array_equal(runner.execute(batch), before)
