"""The fused paged decode-attention kernel against a NumPy reference, on the CPU (T = 1) and on the PYTHON device,
tinygrad's emulator of a GPU with workgroups, local memory and barriers (the code path CUDA and Metal run).

Shapes are tiny: every new kernel shape costs a clang compile on DEV=CPU."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, UOp, dtypes

from worker_svc.paged_attention import paged_decode_attention

BS = 4            # block size
POOL_BLOCKS = 12  # blocks in the pool; block 0 is the null block
W = 5             # block table width


def reference(q: np.ndarray, pool: np.ndarray, tables: np.ndarray, positions: np.ndarray,
              num_blocks: int) -> np.ndarray:
    """model.py's decode attention in float64: q rounded to the pool dtype, softmax over slots s <= position."""
    B, KV, G, hd = q.shape
    qh = q.astype(pool.dtype).astype(np.float64)
    out = np.zeros((B, KV, G, hd))
    for b in range(B):
        slots = np.arange(min(num_blocks * BS, positions[b] + 1))  # the visible ones
        rows = tables[b, slots // BS] * BS + slots % BS
        keys = pool[0, rows].astype(np.float64).reshape(len(slots), KV, hd)
        values = pool[1, rows].astype(np.float64).reshape(len(slots), KV, hd)
        for h in range(KV):
            scores = qh[b, h] @ keys[:, h].T / math.sqrt(hd)  # (G, visible slots)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, h] = (weights / weights.sum(-1, keepdims=True)) @ values[:, h]
    return out


def make_inputs(B: int, KV: int, G: int, hd: int, dtype, seed: int, positions: list[int], num_blocks: int,
                poison: bool = True):
    """Random q and pool, shuffled non-contiguous block tables. With poison, every pool row that no row may see
    (blocks not in any table, slots past a row's position in its own blocks) holds NaN: masked slots must never
    be read, not merely weighted by 0."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, KV, G, hd)).astype(np.float32)
    pool = rng.standard_normal((2, POOL_BLOCKS * BS, KV * hd)).astype(dtype)
    tables = np.stack([rng.permutation(np.arange(1, POOL_BLOCKS))[:W] for _ in range(B)]).astype(np.int32)
    pos = np.array(positions, np.int32)
    if poison:
        seen = np.zeros(POOL_BLOCKS * BS, bool)
        for b in range(B):
            s = np.arange(min(pos[b] + 1, num_blocks * BS))
            seen[tables[b, s // BS] * BS + s % BS] = True
        pool[:, ~seen] = np.nan
    return q, pool, tables, pos


def run(q, pool, tables, pos, num_blocks, device: str | None = None, **kw) -> np.ndarray:
    ts = [Tensor(x, device=device) for x in (q, pool, tables, pos)]
    B, KV, G, hd = q.shape
    return paged_decode_attention(*ts, num_blocks, BS, KV, hd, **kw).numpy()


def tolerance(dtype) -> dict:
    # the kernel accumulates in fp32 in either case; K, V and q are rounded to the pool dtype exactly as in the
    # reference, so fp16 needs no looser bound than fp32's summation-order noise
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 2e-3, "atol": 2e-4}


def bound(n: int) -> UOp:
    return UOp.variable("num_blocks", 1, W).bind(n)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("symbolic", [False, True])
def test_matches_numpy(dtype, symbolic):
    """GQA (G=2), 3 rows at different positions: first slot only, mid-block, last visible block partly masked."""
    positions, nb = [0, 9, 17], 5
    q, pool, tables, pos = make_inputs(3, 2, 2, 8, dtype, seed=1, positions=positions, num_blocks=nb)
    out = run(q, pool, tables, pos, bound(nb) if symbolic else nb)
    assert out.dtype == np.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, reference(q, pool, tables, pos, nb), **tolerance(dtype))


def test_bound_variable_values():
    """One kernel for every block count: fewer blocks than a row's position cut its context short."""
    q, pool, tables, pos = make_inputs(2, 2, 2, 8, np.float16, seed=2, positions=[6, 19], num_blocks=W, poison=False)
    for nb in (1, 2, 5):
        np.testing.assert_allclose(run(q, pool, tables, pos, bound(nb)), reference(q, pool, tables, pos, nb),
                                   **tolerance(np.float16))


def test_fp16_query_fp32_pool():
    q, pool, tables, pos = make_inputs(2, 2, 2, 8, np.float32, seed=3, positions=[3, 12], num_blocks=4)
    q16 = Tensor(q).cast(dtypes.float16)
    out = paged_decode_attention(q16, Tensor(pool), Tensor(tables), Tensor(pos), 4, BS, 2, 8)
    ref = reference(q.astype(np.float16).astype(np.float32), pool, tables, pos, 4)
    np.testing.assert_allclose(out.numpy(), ref, **tolerance(np.float32))


def test_prefill_chunk_rows_share_a_table_row():
    """A prefill chunk: 2 sequences x 3 tokens at consecutive positions, each token a query row with its own causal
    mask, reading its sequence's table row (queries_per_table=3); equals the reference with the rows repeated."""
    positions, nb = [5, 6, 7, 10, 11, 12], 4
    q, pool, tables, pos = make_inputs(6, 2, 2, 8, np.float16, seed=4, positions=positions, num_blocks=nb,
                                       poison=False)
    tables[1::3] = tables[0::3]  # rows 0-2 share table row 0 and rows 3-5 table row 1, as the reference sees them
    tables[2::3] = tables[0::3]
    ts = [Tensor(x) for x in (q, pool, tables[0::3].copy(), pos)]
    out = paged_decode_attention(*ts, nb, BS, 2, 8, queries_per_table=3).numpy()
    np.testing.assert_allclose(out, reference(q, pool, tables, pos, nb), **tolerance(np.float16))


def test_one_kernel():
    """Attention of a layer is exactly one scheduled kernel (inputs realized): no gather, no softmax kernels."""
    ts = [Tensor(x).realize() for x in make_inputs(3, 2, 2, 8, np.float16, seed=4, positions=[0, 9, 17],
                                                   num_blocks=5)]
    out = paged_decode_attention(*ts, bound(5), BS, 2, 8)
    linear, var_vals = out.linear_with_vars()
    names = [call.src[0].arg.name for call in linear.src]
    assert len(names) == 1 and names[0].startswith("paged_decode_attn"), names
    assert var_vals == {"num_blocks": 5}


def test_tinyjit_replay_with_new_block_count():
    """Captured with one block count, replayed with others: the bound variable reaches the kernel each call."""
    q, pool, tables, pos = make_inputs(3, 2, 2, 8, np.float16, seed=5, positions=[2, 10, 19], num_blocks=W,
                                       poison=False)
    ts = [Tensor(x).realize() for x in (q, pool, tables, pos)]

    @TinyJit
    def step(q: Tensor, pool: Tensor, tables: Tensor, pos: Tensor, nb: UOp) -> Tensor:
        return paged_decode_attention(q, pool, tables, pos, nb, BS, 2, 8)

    for nb in (3, 3, 5, 2, 4, 1):  # call 1 runs eagerly, call 2 captures with 3, later calls replay
        out = step(*ts, bound(nb)).numpy()
        np.testing.assert_allclose(out, reference(q, pool, tables, pos, nb), **tolerance(np.float16))
    assert step.captured is not None


@pytest.mark.parametrize("max_threads,heads_per_group,G", [(16, 1, 2), (8, 2, 4), (32, 4, 4), (4, 2, 2)])
def test_workgroup_path_on_python_device(max_threads, heads_per_group, G):
    """The GPU code path (workgroups, local memory, barriers, several slot groups R, head splits) on tinygrad's
    PYTHON device, which emulates threads. fp32 only: that device lowers half local buffers in a way 0.14.0's
    UOp verifier rejects."""
    positions, nb = [0, 9, 17], 5
    q, pool, tables, pos = make_inputs(3, 2, G, 8, np.float32, seed=6, positions=positions, num_blocks=nb)
    out = run(q, pool, tables, pos, bound(nb), device="PYTHON", max_threads=max_threads,
              heads_per_group=heads_per_group)
    np.testing.assert_allclose(out, reference(q, pool, tables, pos, nb), **tolerance(np.float32))


def rotate(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face's rotate-half RoPE of x (B, heads, hd) at each row's position, in float64."""
    half = x.shape[-1] // 2
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("device, parts", [(None, 0), ("PYTHON", 0), (None, 3), ("PYTHON", 2)])
def test_query_rotated_in_the_kernel_from_a_fused_qkv_row(device, parts):
    """q read from the first columns of a wider (B, N) buffer (the QKV projection's output, no copy), rotated for
    each row's position inside the kernel, output in fp16: equals rotating first, then attending. With parts, the
    buffer is (parts, B, N) partial products that the kernel adds up."""
    KV, G, hd, nb = 2, 2, 8, 5
    q, pool, tables, pos = make_inputs(3, KV, G, hd, np.float32, seed=7, positions=[0, 9, 17], num_blocks=nb)
    rng = np.random.default_rng(8)
    angles = np.outer(np.arange(32), rng.uniform(0.01, 1.0, hd // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    qkv = np.concatenate([q.reshape(3, -1), rng.standard_normal((3, 2 * KV * hd)).astype(np.float32)], 1)
    rope = (Tensor(cos, device=device), Tensor(sin, device=device))
    if parts:
        split = rng.standard_normal((parts - 1, *qkv.shape)).astype(np.float32)
        qkv = np.concatenate([split, (qkv - split.sum(0))[None]])
    out = paged_decode_attention(Tensor(qkv, device=device), Tensor(pool, device=device),
                                 Tensor(tables, device=device), Tensor(pos, device=device), nb, BS, KV, hd,
                                 num_heads=KV * G, rope=rope, out_dtype=dtypes.float16,
                                 **({"max_threads": 8} if device else {}))
    assert out.dtype == dtypes.float16 and out.shape == (3, KV, G, hd)
    rotated = rotate(q.reshape(3, KV * G, hd).astype(np.float64), pos, cos, sin).reshape(q.shape)
    np.testing.assert_allclose(out.numpy().astype(np.float32), reference(rotated, pool, tables, pos, nb),
                               rtol=2e-3, atol=2e-3)
