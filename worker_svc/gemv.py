"""Matrix-vector products of one row (a batch-1 decode step) as one custom kernel each, with what surrounds them
fused in: the row's RMSNorm before the QKV and gate/up products, SwiGLU before the down product, the residual add
after the O and down products.

tinygrad's own matrix-vector kernels (and `model.norm_project`) read the weights at 0.5-1.6 TB/s of the H200's
4.2-4.8: their lanes load 2-8 bytes at a time. Here all T = 32 * warps threads of a workgroup split K: thread t
reads k = c * 8T + 8t .. 8t + 7 of each of the workgroup's `rows` weight rows (16 consecutive bytes per load; a
warp's loads are 512 contiguous bytes), for c < K / 8T, and the T partial sums of each row are added in shared
memory in two stages (each warp's 32, then the warps'). The input row's slice is read once per thread and serves
all rows. On devices without local memory (CPU) the same code runs with one thread per workgroup.

The QKV product also writes the token's K (rotated) and V into the paged KV pool (`gemv_qkv`), which saves the
separate write kernel (22 launches a batch-1 step at the TinyLlama shape). For that a workgroup's rows are two
pairs (d, d + head_dim / 2) of one head, the pairs RoPE's rotate-half layout mixes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace, DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

VEC = 8  # halves per thread and chunk: one 16-byte load


@dataclass(frozen=True)
class GemvPlan:
    rows: int   # weight rows per workgroup
    warps: int  # warps per workgroup (all of them split K)


@dataclass(frozen=True)
class KVWrite:
    """The layout of the QKV product's rows for `gemv_qkv`: q_dim rows of Q, then kv_dim rows of K and of V, in heads
    of head_dim. The K and V rows go to the (2, slots, kv_dim) pool at slot slots[0], K rotated for positions[0]."""
    q_dim: int
    head_dim: int


def plan_for(N: int, K: int, lanes: int = 32, rows: int = 4) -> GemvPlan | None:
    """Up to 8 warps that split K into whole 16-byte chunks (11 for TinyLlama's K = 5632: 352 threads, two chunks
    each), `rows` rows per workgroup. None where K is not a multiple of 8 * lanes or N of the rows."""
    if K % (VEC * lanes) or N % rows:
        return None
    per_warp = K // (VEC * lanes)  # chunks of one warp's width in K
    warps = max(w for w in range(1, 9) if per_warp % w == 0)
    if warps < 4:  # a prime factor above 8 (TinyLlama's 5632 = 22 x 256): that many warps, at most 2 chunks a thread
        warps = next((w for w in range(4, 33) if per_warp % w == 0 and (per_warp // w) <= 2), warps)
    return GemvPlan(rows, warps)


def kv_write_fits(plan: GemvPlan, N: int, head_dim: int) -> bool:
    """Whether `gemv_qkv` can pair each workgroup's rows as RoPE's (d, d + head_dim / 2)."""
    return plan.rows % 2 == 0 and (head_dim // 2) % (plan.rows // 2) == 0 and N % head_dim == 0


# memoised like paged_attention's kernel: the layers of a graph build the same kernel from the same (hash-consed)
# placeholders
@functools.lru_cache(maxsize=64)
def _gemv_kernel(out: UOp, x: UOp, w: UOp, *extra: UOp, plan: GemvPlan, lanes: int, norm_eps: float | None,
                 swiglu: bool, residual: bool, kv: KVWrite | None = None) -> UOp:
    N, K = w.shape
    local = lanes > 1
    R, W = plan.rows, plan.warps if local else 1
    T = W * lanes
    C = K // (VEC * T)
    f32, wi = dtypes.float, dtypes.weakint
    extra = list(extra)
    g = extra.pop(0) if norm_eps is not None else None
    res = extra.pop(0) if residual else None
    pool, cos, sin, positions, slots = extra if kv is not None else (None,) * 5
    ids = iter(range(64))
    zero = UOp.const(0, wi)

    grp = UOp.range(N // R, next(ids))
    if kv is None:
        def row(r: UOp | int) -> UOp:  # the workgroup's r-th weight row
            return grp * R + r
    else:  # rows (d, d + half) of a head in one workgroup: m consecutive d, then their partners
        assert kv_write_fits(plan, N, kv.head_dim), (plan, kv, N)
        m, half = R // 2, kv.head_dim // 2
        per_head = half // m

        def row(r: UOp | int) -> UOp:
            return (grp // per_head) * kv.head_dim + (grp % per_head) * m + r % m + (r // m) * half
    lane = UOp.range(lanes, next(ids), AxisType.WARP) if local else zero
    wp = UOp.range(W, next(ids), AxisType.WARP) if local and W > 1 else zero
    t = wp * lanes + lane
    outer = tuple(r for r in (grp, lane, wp) if r.op is Ops.RANGE)
    V = R + (1 if g is not None else 0)  # sums per thread: one per row, and the input's sum of squares

    acc = UOp.placeholder((V,), f32, 0, addrspace=AddrSpace.REG)
    acc = acc.after(UOp.group(*[acc.after(*outer)[v].store(0.0) for v in range(V)]))
    c = UOp.range(C, next(ids), AxisType.REDUCE) if C > 1 else zero
    ks = [c * (VEC * T) + t * VEC + u for u in range(VEC)]
    if swiglu:  # x holds gate then up: silu(gate) * up, in fp32
        gates = [x[k].cast(f32) for k in ks]
        xin = [gt / (1.0 + (-gt).exp()) * x[K + k].cast(f32) for gt, k in zip(gates, ks)]
    else:
        xs = [x[k].cast(f32) for k in ks]
        xin = [xv * g[k].cast(f32) for xv, k in zip(xs, ks)] if g is not None else xs

    def dot(r: int) -> UOp:  # this thread's share of row r's product
        terms = [xin[u] * w[row(r), ks[u]].cast(f32) for u in range(VEC)]
        return sum(terms[1:], terms[0])
    part = [dot(r) for r in range(R)]
    if g is not None:
        part.append(sum((xv * xv for xv in xs[1:]), xs[0] * xs[0]))
    cur = acc.after(c) if C > 1 else acc
    done = UOp.group(*[acc[v].store(cur[v] + part[v]) for v in range(V)])
    done = done.end(c) if C > 1 else done
    fin = acc.after(done)

    if local:  # T partial sums per value -> 32 lanes' sums of each warp -> the warps' sum, in shared memory
        red = UOp.placeholder((V * T,), f32, 1, addrspace=AddrSpace.LOCAL)
        red = red.after(UOp.group(*[red[v * T + t].store(fin[v]) for v in range(V)]).barrier())
        red2 = UOp.placeholder((V * W,), f32, 2, addrspace=AddrSpace.LOCAL)
        ok = t < V * W
        v2, j2 = t // W, t % W
        lane_sums = [red[(v2 * T + j2 * lanes + i).valid(ok)] for i in range(lanes)]
        s2 = sum(lane_sums[1:], lane_sums[0])
        red2 = red2.after(red2[(v2 * W + j2).valid(ok)].store(s2).barrier())

        def total(v: UOp, gate: UOp | None) -> UOp:
            idx = [v * W + j for j in range(W)]
            sums = [red2[_gated(i, gate)] for i in idx]
            return sum(sums[1:], sums[0])
        rows_out = [(t, t < R)]  # thread t < R writes row t
    else:
        def total(v: UOp, gate: UOp | None) -> UOp:
            return fin[v]
        rows_out = [(UOp.const(r, wi), None) for r in range(R)]

    inv_rms = (total(UOp.const(R, wi), None) * (1.0 / K) + norm_eps).rsqrt() if g is not None else None

    def product(r: UOp, gate: UOp | None) -> UOp:  # row r's finished product, before the residual
        return total(r, gate) * inv_rms if inv_rms is not None else total(r, gate)
    stores = []
    for r, gate in rows_out:
        val = product(r, gate)
        n = row(r)
        if res is not None:
            val = val + res[_gated(n, gate)].cast(f32)
        stores.append(out[_gated(n, gate)].store(val.cast(out.dtype)))
        if kv is not None:
            stores += _kv_stores(kv, pool, cos, sin, positions, slots, n, r, m, gate, val,
                                 product((r + m) % (2 * m), gate))
    name = f"gemv_{N}_{K}" + "_norm" * (g is not None) + "_swiglu" * swiglu + "_res" * (res is not None)
    return UOp.group(*stores).end(*outer).sink(arg=KernelInfo(name=name, opts_to_apply=()))


def _gated(index: UOp, gate: UOp | None) -> UOp:
    """The index, valid only where the gate holds (loads read 0, stores are skipped); as is without a gate."""
    return index if gate is None else index.valid(gate)


def _kv_stores(kv: KVWrite, pool: UOp, cos: UOp, sin: UOp, positions: UOp, slots: UOp, n: UOp, r: UOp, m: int,
               gate: UOp | None, val: UOp, partner: UOp) -> list[UOp]:
    """Row n's value into the pool when it is a K row (rotated with its partner d +- half: Hugging Face's
    rotate-half, in fp32 like the NumPy reference and kv_cache's write kernel) or a V row."""
    kv_dim = pool.shape[2]
    first = r < m  # d < half
    freq = n % kv.head_dim - first.where(0, kv.head_dim // 2)
    pos = positions[0].cast(dtypes.weakint).maximum(0).minimum(cos.shape[0] - 1)
    rotated = val * cos[pos, freq] + first.where(-partner, partner) * sin[pos, freq]
    slot = slots[0].cast(dtypes.weakint)
    is_k = (n >= kv.q_dim) & (n < kv.q_dim + kv_dim)
    is_v = n >= kv.q_dim + kv_dim
    k_ok, v_ok = (is_k & gate, is_v & gate) if gate is not None else (is_k, is_v)
    kcol = (n - kv.q_dim).maximum(0).minimum(kv_dim - 1)
    vcol = (n - kv.q_dim - kv_dim).maximum(0).minimum(kv_dim - 1)
    return [pool[0, slot, kcol.valid(k_ok)].store(rotated.cast(pool.dtype)),
            pool[1, slot, vcol.valid(v_ok)].store(val.cast(pool.dtype))]


def lanes_for(device: str) -> int:
    """Threads per warp of this kernel on the device: 32 on GPUs, 1 where there is no local memory (CPU)."""
    return 32 if Device[device].renderer.has_local else 1


def gemv(x: Tensor, w: Tensor, plan: GemvPlan, norm: tuple[Tensor, float] | None = None, swiglu: bool = False,
         residual: Tensor | None = None, out_dtype: DType | None = None) -> Tensor:
    """w (N, K) @ f(x) for one row x: (K,) (or (2K,) of gate then up with swiglu), f the RMSNorm with weight
    norm[0] and eps norm[1], SwiGLU, or nothing. With a residual (N,), returns residual + product in float32;
    otherwise (N,) in out_dtype (default w's)."""
    N, K = w.shape
    assert x.numel() == (2 * K if swiglu else K), f"x {x.shape} for w {w.shape}"
    dtype = dtypes.float if residual is not None else (out_dtype or w.dtype)
    out = Tensor.empty(N, dtype=dtype, device=w.device)
    ins = [x.reshape(-1), w] + ([norm[0]] if norm is not None else [])
    ins += [residual.reshape(N)] if residual is not None else []
    fxn = functools.partial(_gemv_kernel, plan=plan, lanes=lanes_for(w.device), swiglu=swiglu,
                            norm_eps=None if norm is None else norm[1], residual=residual is not None)
    return out.custom_kernel(*ins, fxn=fxn)[0]


def gemv_qkv(x: Tensor, w: Tensor, plan: GemvPlan, norm: tuple[Tensor, float], pool: Tensor, rope: tuple[Tensor, Tensor],
             positions: Tensor, slots: Tensor, q_dim: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """The one-row QKV product with its norm (as `gemv`), which also stores the token's rope(K) and V at slots[0]
    of `pool` (2, slots, kv_dim), positions[0] giving K's rotation. Returns (qkv (N,) in w's dtype, the pool
    ordered after the write)."""
    N, K = w.shape
    assert x.numel() == K and pool.shape[2] * 2 + q_dim == N, f"x {x.shape}, w {w.shape}, pool {pool.shape}"
    out = Tensor.empty(N, dtype=w.dtype, device=w.device)
    kv = KVWrite(q_dim, head_dim)
    fxn = functools.partial(_gemv_kernel, plan=plan, lanes=lanes_for(w.device), swiglu=False, norm_eps=norm[1],
                            residual=False, kv=kv)
    ins = [out, x.reshape(-1), w, norm[0], pool, *rope, positions.reshape(-1), slots.reshape(-1)]
    after = Tensor.custom_kernel(*ins, fxn=fxn)
    return after[0], after[4]
