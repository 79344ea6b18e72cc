"""Fused paged attention (one query token per row) as ONE tinygrad custom kernel per layer, for decode and prefill.

Attention as Tensor ops gathers K and V out of the pool (two materialised copies of the context), then runs
scores, max, exp-sum and P@V as separate kernels: about 8 launches per layer. This kernel reads K and V in place
from the paged pool through the block table and keeps every intermediate on chip. A prefill chunk's tokens are
rows too, each with its own position, sharing their sequence's table row (`queries_per_table`).

Work layout on GPUs (`Renderer.has_local`):
  * one workgroup per (row b, kv head h, group of Gw query heads). The Gw query heads that share the KV head reuse
    every K/V element the workgroup loads. Gw = G (all heads of the KV head) unless B * KV is too small to fill the
    GPU, then G is split over more workgroups (batch 1 would otherwise run on only KV multiprocessors).
  * T threads walk the context in chunks of C = T slots with an online ("flash") softmax. Per chunk:
      1. stage the chunk's K and V rows in shared memory: straight-line, 4-wide vector loads, consecutive threads
         on consecutive elements of a row, all issued before the first use (one memory latency per chunk);
      2. thread t computes the Gw scores of slot t (q staged once in shared memory, broadcast reads);
      3. running max: each thread takes the max of a strip of the chunk's scores, then every thread combines the
         strips (T reads instead of Gw * C); thread t writes p = exp(s - m) for its slot;
      4. thread (r, d) accumulates p * V[slot, d] over slots r, r + R, ... from shared memory; the old partial sums
         are rescaled by exp(m_old - m_new). The R slot groups' sums are added through shared memory at the end.
  * masked slots (s > position, or past num_blocks * block_size) are never loaded: their loads are gated.
  * T = 128 threads, or 64 once B * KV workgroups fill the GPU (measured faster there); fewer where shared memory
    is short (Metal's 32 KiB). The grid is (B, KV, G / Gw) whatever num_blocks is, so CUDA graphs that tinygrad
    builds with every variable set to 0 still get a valid launch (upstream issue #9065 does not apply).
On CPU (no local memory, no threads) the same code runs with T = 1 and C = 16: shared buffers become register
arrays and the per-lane work is plain loops, so the CPU tests exercise the algorithm the GPU runs.

Measured on one H100 (fp16 pool, KV=4, G=8, hd=64, block 16, every row at full context, per layer including the
graph launch): ctx 2048 B=64 2799 us (Tensor code) -> 81 us, B=256 3008 -> 299 us (about 1.8 TB/s of K+V),
B=1 about 6 us.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace, DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

from worker_svc.tc_gemm import partials_at

NEG_BIG = -1e30
"""Running-max start and masked-score value: finite, so exp(m_old - m_new) never computes inf - inf = NaN."""

TARGET_WORKGROUPS = 512
"""Split the G query heads of a KV head over workgroups until B * KV * splits reaches this (H100/H200: 132 SMs).
`python -m bench.attention` on an H200, TinyLlama's heads (KV 4, G 8), per layer: batch 64 at context 256 took
31.5 us with all 8 heads in each of 256 workgroups of 64 threads, 22.0 us with 4 heads in each of 512 workgroups
of 128 threads (context 1024: 111.5 -> 71.7 us); batch 256 (1,024 workgroups) is fastest unsplit, at 64 threads."""


def _smem_bytes(T: int, C: int, hd: int, gw: int, kstride: int, itemsize: int) -> int:
    """Shared memory of one workgroup: K (padded rows), V, q, scores, p, strip maxima, partial sums."""
    R = T // math.gcd(T, hd)
    red = 4 * R * gw * hd if R > 1 else 0
    return (C * kstride + C * hd + gw * hd) * itemsize + 4 * (2 * gw * C + T + R * gw) + red


def _plan(B: int, KV: int, G: int, hd: int, itemsize: int, max_threads: int, smem_max: int,
          heads_per_group: int | None = None) -> tuple[int, int, int]:
    """(threads T, heads per workgroup Gw, K row stride in shared memory) for these shapes.

    The K row stride is padded to an odd number of 32-bit words: thread t then reads row t from bank t mod 32
    instead of all threads of a warp hitting the same bank."""
    pad = max(1, 4 // itemsize)
    kstride = hd + pad
    while (kstride * itemsize // 4) % 2 == 0: kstride += pad
    if max_threads <= 1: return 1, G, kstride
    # down to one head a workgroup only for a single row: at batch 64 one head took 1.4x as long as two
    min_gw = 1 if B == 1 else 2
    splits = 1
    while G % (splits * 2) == 0 and G // (splits * 2) >= min_gw and B * KV * splits < TARGET_WORKGROUPS: splits *= 2
    gw = G // splits if heads_per_group is None else heads_per_group
    assert G % gw == 0, f"{heads_per_group=} must divide G={G}"
    T = max_threads
    while T > 1 and (T % gw != 0 or _smem_bytes(T, T, hd, gw, kstride, itemsize) > smem_max - 1024): T //= 2
    assert T >= gw and T % gw == 0, f"no workgroup shape fits {smem_max} bytes of shared memory"
    return T, gw, kstride


# memoised: every layer of a graph builds the same kernel from the same (hash-consed) placeholders, and building one
# takes tens of milliseconds of Python at the TinyLlama shape (bench.startup: 15% of a worker restart's warm-up)
@functools.lru_cache(maxsize=64)
def _decode_attention_kernel(out: UOp, q: UOp, pool: UOp, tables: UOp, positions: UOp, rope_cos: UOp | None,
                             rope_sin: UOp | None, num_blocks: UOp | int, block_size: int, T: int, gw: int,
                             kstride: int, queries_per_table: int = 1, table_offset: int = 0) -> UOp:
    """The kernel body (see the module docstring). `num_blocks` is an int or the ALU PARAM of the bound variable.
    q is (B, N) with the query heads in its first KV * G * hd columns; with rope tables it is rotated here."""
    B, KV, G, hd = out.shape
    pdt: DType = pool.dtype
    f32, wi = dtypes.float32, dtypes.weakint
    local = T > 1
    C = T if local else 16                # slots per chunk
    Dl = math.gcd(T, hd)                  # lanes across head_dim in P@V
    R, KD = T // Dl, hd // Dl             # slot groups in P@V, head dims per lane
    VEC = 4 if hd % 4 == 0 else 1         # contiguous elements per load: tinygrad folds them into one vector load
    space = AddrSpace.LOCAL if local else AddrSpace.REG
    ids = iter(range(1000))
    zero = UOp.const(0, wi)

    def loop(n: int, body: Callable[[UOp], UOp], unroll: bool = False) -> UOp:
        """body(i) for i < n: straight-line code when unrolled (GPU: loads issued together), else one loop."""
        if n == 1: return body(zero)
        if unroll: return UOp.group(*[body(UOp.const(i, wi)) for i in range(n)])
        i = UOp.range(n, next(ids), AxisType.LOOP)
        return body(i).end(i)

    def sync(*stores: UOp) -> UOp:
        """Stores so far are visible to every lane: a workgroup barrier on GPUs, just an ordering on CPU."""
        g = UOp.group(*stores)
        return g.barrier() if local else g

    b, h = UOp.range(B, next(ids)), UOp.range(KV, next(ids))
    gs = UOp.range(G // gw, next(ids)) if G > gw else zero
    # lane = r * Dl + dl: two thread ranges, dl first so that it becomes threadIdx.x. They are WARP ranges, which
    # tinygrad maps to threads exactly like LOCAL ones but never splits: a LOCAL range used as `x % c` gets split
    # (codegen/simplify.py pm_split_ranges) with its major half as threadIdx.x, which scatters a warp's lanes
    dl = UOp.range(Dl, next(ids), AxisType.WARP) if local else zero
    r = UOp.range(R, next(ids), AxisType.WARP) if R > 1 else zero
    lane = r * Dl + dl
    outer = tuple(x for x in (b, h, gs, dl, r) if x.op is Ops.RANGE)

    S = num_blocks * block_size
    pool_blocks = pool.shape[1] // block_size
    limit = (positions[b].cast(wi) + 1).minimum(S)  # slot s is visible iff s < limit
    table_row = b // queries_per_table if queries_per_table > 1 else b
    scale = 1.0 / math.sqrt(hd)

    def row_of(s: UOp, ok: UOp) -> UOp:
        """Pool row of context slot s through the block table; no load at all when the slot is masked."""
        # the clamp costs two instructions and bounds the row: without it tinygrad wraps every pool index in a
        # 64-bit modulo by the pool size
        blk = tables[table_row, (table_offset + s // block_size).valid(ok)].cast(wi).maximum(0).minimum(pool_blocks - 1)
        return blk * block_size + s % block_size

    # shared (GPU) / register (CPU) buffers
    q_s = UOp.placeholder((gw * hd,), pdt, 0, addrspace=space)       # q rounded to the pool dtype
    k_s = UOp.placeholder((C * kstride,), pdt, 1, addrspace=space)   # K rows of the chunk, padded
    v_s = UOp.placeholder((C * hd,), pdt, 2, addrspace=space)        # V rows of the chunk
    s_s = UOp.placeholder((gw * C,), f32, 3, addrspace=space)        # scores of the chunk
    p_s = UOp.placeholder((gw * C,), f32, 4, addrspace=space)        # exp(score - running max)
    # per-lane state and scratch, in registers
    m_r = UOp.placeholder((gw,), f32, 10, addrspace=AddrSpace.REG)       # running max
    l_r = UOp.placeholder((gw,), f32, 11, addrspace=AddrSpace.REG)       # running sum of p, this lane's slots
    a_r = UOp.placeholder((gw * KD,), f32, 12, addrspace=AddrSpace.REG)  # running sum of p * v, this lane's dims
    sc_r = UOp.placeholder((gw,), f32, 13, addrspace=AddrSpace.REG)      # dot products
    mx_r = UOp.placeholder((gw,), f32, 14, addrspace=AddrSpace.REG)      # chunk max
    pa_r = UOp.placeholder((gw * KD,), f32, 15, addrspace=AddrSpace.REG)  # chunk's p * v
    pl_r = UOp.placeholder((gw,), f32, 16, addrspace=AddrSpace.REG)      # chunk's p

    # q rounded to the pool dtype like the Tensor code's q.cast(keys.dtype). Storing it in a buffer of that dtype
    # is what makes the rounding happen: tinygrad folds a float -> half -> float cast chain away
    def stage_q(i: UOp) -> UOp:
        qi = i * T + lane
        ok = qi < gw * hd
        d = qi % hd
        col = ((h * G + gs * gw + qi // hd) * hd + d).valid(ok)
        x = partials_at(q, b, col)
        if rope_cos is not None:  # Hugging Face's rotate-half layout, in fp32 like the NumPy reference
            half = hd // 2
            first = d < half
            pos = positions[b].cast(wi).maximum(0).minimum(rope_cos.shape[0] - 1)
            freq = first.where(d, d - half)
            partner = partials_at(q, b, first.where(col + half, col - half))
            x = x * rope_cos[pos, freq] + first.where(-partner, partner) * rope_sin[pos, freq]
        return q_s[qi.valid(ok)].store(x.cast(pdt))
    q_sh = q_s.after(sync(loop((gw * hd + T - 1) // T, stage_q, unroll=local)))

    init = UOp.group(*[m_r.after(*outer)[g].store(NEG_BIG) for g in range(gw)],
                     *[l_r.after(*outer)[g].store(0.0) for g in range(gw)],
                     loop(gw * KD, lambda i: a_r.after(*outer)[i].store(0.0)))
    m_st, l_st, a_st = m_r.after(init), l_r.after(init), a_r.after(init)

    ch = UOp.range((S + (C - 1)) // C, next(ids), AxisType.LOOP)
    base = ch * C

    # 1. stage K and V rows: VEC contiguous elements per lane and pass, consecutive lanes on consecutive elements
    def stage_kv(p: UOp) -> UOp:
        flat = (p * T + lane) * VEC
        c, e0 = flat // hd, flat % hd
        inside = flat < C * hd
        ok = inside & (base + c < limit)
        row = row_of(base + c, ok).valid(ok)
        # masked slots store zeros (a gated load reads 0): stale V there would give 0 * NaN in P @ V
        return UOp.group(*[k_s[(c * kstride + e0 + u).valid(inside)].store(pool[0, row, h * hd + e0 + u])
                           for u in range(VEC)],
                         *[v_s[(c * hd + e0 + u).valid(inside)].store(pool[1, row, h * hd + e0 + u])
                           for u in range(VEC)])
    kv_ready = sync(loop((C * hd + T * VEC - 1) // (T * VEC), stage_kv, unroll=local))
    k_sh, v_sh = k_s.after(kv_ready), v_s.after(kv_ready)

    # 2. scores of this lane's slots c = j*T + lane, all Gw heads from one read of each K element
    def scores(j: UOp) -> UOp:
        c = j * T + lane
        sc0 = sc_r.after(ch, kv_ready, *([j] if j.op is Ops.RANGE else []))
        sc1 = sc0.after(UOp.group(*[sc0[g].store(0.0) for g in range(gw)]))
        e4 = UOp.range(hd // VEC, next(ids), AxisType.REDUCE)
        ks = [k_sh[c * kstride + e4 * VEC + u].cast(f32) for u in range(VEC)]
        dots = [sum((q_sh[g * hd + e4 * VEC + u].cast(f32) * ks[u] for u in range(1, VEC)),
                    q_sh[g * hd + e4 * VEC].cast(f32) * ks[0]) for g in range(gw)]
        done = UOp.group(*[sc1[g].store(sc1.after(e4)[g] + dots[g]) for g in range(gw)]).end(e4)
        ok = base + c < limit
        return UOp.group(*[s_s[g * C + c].store(ok.where(sc1.after(done)[g] * scale, NEG_BIG)) for g in range(gw)])
    s_sh = s_s.after(s_ready := sync(loop(C // T, scores)))

    # 3. new running max: strips of the chunk's scores first (GPU), then every lane combines them
    m_old = [m_st.after(ch)[g] for g in range(gw)]
    mx0 = mx_r.after(ch, s_ready)
    mx1 = mx0.after(UOp.group(*[mx0[g].store(m_old[g]) for g in range(gw)]))
    if local:
        ns = T // gw                      # lanes per head in the strip pass; each takes C // ns scores
        pm_s = UOp.placeholder((T,), f32, 5, addrspace=space)
        g1, j1 = lane // ns, lane % ns
        strip = [s_sh[g1 * C + j1 + k * ns] for k in range(C // ns)]
        pm_sh = pm_s.after(sync(pm_s[lane].store(_max_all(strip))))
        cand, n_cand = (lambda g, i: pm_sh[g * ns + i]), ns
    else:
        cand, n_cand = (lambda g, i: s_sh[g * C + i]), C
    ic = UOp.range(n_cand, next(ids), AxisType.REDUCE)
    mx_done = UOp.group(*[mx1[g].store(mx1.after(ic)[g].maximum(cand(g, ic))) for g in range(gw)]).end(ic)
    m_new = [mx1.after(mx_done)[g] for g in range(gw)]
    alpha = [(m_old[g] - m_new[g]).exp() for g in range(gw)]

    def probs(j: UOp) -> UOp:
        c = j * T + lane
        ok = base + c < limit
        return UOp.group(*[p_s[g * C + c].store(ok.where((s_sh[g * C + c] - m_new[g]).exp(), 0.0))
                           for g in range(gw)])
    p_ready = sync(loop(C // T, probs))
    p_sh = p_s.after(p_ready)

    # 4. P @ V from shared memory: lane (r, dl) sums p * v over slots r, r + R, ... for head dims dl + k*Dl
    iv = UOp.range(C // R, next(ids), AxisType.REDUCE)
    cv = iv * R + r
    pa0 = pa_r.after(ch, p_ready)
    pa1 = pa0.after(loop(gw * KD, lambda i: pa0[i].store(0.0)))
    pl0 = pl_r.after(ch, p_ready)
    pl1 = pl0.after(UOp.group(*[pl0[g].store(0.0) for g in range(gw)]))
    p_v = [p_sh[g * C + cv] for g in range(gw)]

    def pv(kd: UOp) -> UOp:
        v = v_sh[cv * hd + dl + kd * Dl].cast(f32)
        return UOp.group(*[pa1[g * KD + kd].store(pa1.after(iv, *([kd] if kd.op is Ops.RANGE else []))[g * KD + kd]
                                                  + p_v[g] * v) for g in range(gw)])
    psum = UOp.group(*[pl1[g].store(pl1.after(iv)[g] + p_v[g]) for g in range(gw)])
    # the barrier keeps the next chunk's staging from overwriting V rows that slower lanes still read
    pv_done = sync(UOp.group(loop(KD, pv), psum).end(iv))
    pa2, pl2 = pa1.after(pv_done), pl1.after(pv_done)

    # fold the chunk into the running state
    chunk_done = UOp.group(
        *[m_st[g].store(m_new[g]) for g in range(gw)],
        *[l_st[g].store(l_st.after(ch)[g] * alpha[g] + pl2[g]) for g in range(gw)],
        loop(KD, lambda kd: UOp.group(*[a_st[g * KD + kd].store(a_st.after(ch)[g * KD + kd] * alpha[g] +
                                                                pa2[g * KD + kd]) for g in range(gw)]))).end(ch)
    a_fin, l_fin = a_st.after(chunk_done), l_st.after(chunk_done)

    if R == 1:
        def store_out(kd: UOp) -> UOp:
            return UOp.group(*[out[b, h, gs * gw + g, dl + kd * Dl].store(
                (a_fin[g * KD + kd] / l_fin[g].maximum(1e-30)).cast(out.dtype)) for g in range(gw)])
        done = loop(KD, store_out)
    else:
        # add the R slot groups' partial sums through shared memory. (Reusing the scores buffer for this trips
        # tinygrad's memory coalescing, which asserts on two stores to one buffer at the same index expression)
        red_a = UOp.placeholder((R * gw * hd,), f32, 6, addrspace=space)
        red_l = UOp.placeholder((R * gw,), f32, 7, addrspace=space)
        parts = sync(loop(KD, lambda kd: UOp.group(*[red_a[(r * gw + g) * hd + dl + kd * Dl].store(a_fin[g * KD + kd])
                                                     for g in range(gw)])),
                     *[red_l[(r * gw + g).valid(dl.eq(0))].store(l_fin[g]) for g in range(gw)])
        red_a, red_l = red_a.after(parts), red_l.after(parts)

        def store_out(kd: UOp) -> UOp:
            stores = []
            for g in range(gw):
                d = dl + kd * Dl
                acc = sum((red_a[(i * gw + g) * hd + d] for i in range(1, R)), red_a[g * hd + d])
                lsum = sum((red_l[i * gw + g] for i in range(1, R)), red_l[g])
                stores.append(out[b, h, gs * gw + g, d.valid(r.eq(0))].store((acc / lsum.maximum(1e-30)).cast(out.dtype)))
            return UOp.group(*stores)
        done = loop(KD, store_out)
    return done.end(*outer).sink(arg=KernelInfo(name=f"paged_decode_attn_g{gw}_hd{hd}_t{T}", opts_to_apply=()))


def _max_all(xs: list[UOp]) -> UOp:
    """Pairwise max of a list, as a balanced tree (short dependency chains)."""
    while len(xs) > 1: xs = [xs[i].maximum(xs[i + 1]) if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
    return xs[0]


def _custom_kernel_with_var(tensors: list[Tensor], fxn: Callable[..., UOp], num_blocks: UOp | int) -> list[Tensor]:
    """Tensor.custom_kernel, plus one bound symbolic variable that the kernel body may use.

    Tensor.custom_kernel takes only tensors. A bound Variable has to be a source of the CALL (that is how its value
    reaches the launch: engine/realize.py get_call_var_uops matches it by name) and appear in the body as an ALU
    PARAM of the same name. Using the bound variable itself in the body fails UOp verification."""
    srcs = [t.uop for t in tensors]
    placeholders = [UOp.placeholder_like(s, slot=i) for i, s in enumerate(srcs)]
    if isinstance(num_blocks, int):
        call = fxn(*placeholders, num_blocks).call(*srcs)
    else:
        var = num_blocks.src[0] if num_blocks.is_bound_var else num_blocks
        assert var.is_variable and num_blocks.is_bound_var, f"num_blocks: int or bound UOp.variable, not {num_blocks}"
        call = fxn(*placeholders, var.replace(op=Ops.PARAM)).call(*srcs, num_blocks)
    return [Tensor(s.after(call)) for s in srcs]


def paged_decode_attention(q: Tensor, pool: Tensor, block_tables: Tensor, positions: Tensor, num_blocks: UOp | int,
                           block_size: int, num_kv_heads: int, head_dim: int, num_heads: int | None = None,
                           rope: tuple[Tensor, Tensor] | None = None, out_dtype: DType = dtypes.float32,
                           max_threads: int | None = None, heads_per_group: int | None = None,
                           queries_per_table: int = 1, table_offset: int = 0) -> Tensor:
    """softmax(q.k / sqrt(hd)) @ v over each row's visible slots, read in place from the paged pool, in one kernel.

    q: (B, KV, G, hd), or (B, N) whose first num_heads * hd columns are the query heads (the fused QKV projection's
    output, read without a copy), or (S, B, N): S partial products over K of that projection, which the kernel adds
    up (no kernel of their own); any float dtype (rounded to the pool dtype like the Tensor code). rope: the
    (max_position, hd / 2) fp32 cos and sin tables, to rotate q for `positions` inside the kernel (one kernel fewer
    than rotating it first). pool: (2, rows, KV * hd), K at [0] and V at [1]. block_tables: (B, W) int32, of which
    the first num_blocks columns are read; num_blocks is an int or a bound UOp.variable. positions: (B,) int32; slot s
    (row tables[b, s // block_size] * block_size + s % block_size) is visible iff s <= positions[b].
    Returns (B, KV, G, hd) in out_dtype (accumulation is fp32 whatever it is).
    max_threads: threads per workgroup on GPUs (ignored where the device has no local memory). Default: 64 when
    B * KV workgroups fill the GPU, else 128 (H200, ctx 1024: B=256 180 vs 198 us per layer; see TARGET_WORKGROUPS).
    heads_per_group: query heads per workgroup on GPUs (default: all G unless B * KV workgroups are too few).
    queries_per_table: consecutive rows of q that share a block-table row (a prefill chunk's T tokens, each a row
    with its own position: block_tables then has B / queries_per_table rows). Causal attention within the chunk
    is the position mask; the chunk's keys must be in the pool already.
    table_offset: the tables start at this column of block_tables (the runner's packed metadata, read in place:
    a (B, W) slice of it would be a copy kernel of its own)."""
    KV, hd = num_kv_heads, head_dim
    if q.ndim == 4:
        B, _, G, _ = q.shape
        assert q.shape[1] == KV and q.shape[3] == hd, f"q {q.shape} vs {num_kv_heads=} {head_dim=}"
        q = q.reshape(B, KV * G * hd)
    else:
        assert num_heads is not None and num_heads % KV == 0, "a (B, N) q needs num_heads, a multiple of KV"
        assert q.ndim in (2, 3), f"q {q.shape}: (B, KV, G, hd), (B, N) or (S, B, N)"
        B, G = q.shape[-2], num_heads // KV
        assert q.shape[-1] >= KV * G * hd, f"q {q.shape} holds fewer than {num_heads} heads of {hd}"
    assert pool.shape[0] == 2 and pool.shape[2] == KV * hd and pool.shape[1] % block_size == 0, f"pool {pool.shape}"
    assert block_tables.ndim == 2 and block_tables.shape[0] * queries_per_table == B and positions.shape == (B,)
    renderer = Device[pool.device if isinstance(pool.device, str) else pool.device[0]].renderer
    if max_threads is None: max_threads = 64 if B * KV >= TARGET_WORKGROUPS else 128
    threads = max_threads if renderer.has_local else 1
    T, gw, kstride = _plan(B, KV, G, hd, pool.dtype.itemsize, threads, renderer.shared_max, heads_per_group)
    out = Tensor.empty(B, KV, G, hd, dtype=out_dtype, device=pool.device)
    ins = [out, q, pool, block_tables.cast(dtypes.int32), positions.cast(dtypes.int32), *(rope or ())]

    def fxn(o: UOp, qq: UOp, p: UOp, t: UOp, pos: UOp, *rest: UOp | int) -> UOp:
        *tables, nb = rest
        cos, sin = tables if tables else (None, None)
        return _decode_attention_kernel(o, qq, p, t, pos, cos, sin, nb, block_size, T, gw, kstride, queries_per_table,
                                        table_offset)
    return _custom_kernel_with_var(ins, fxn, num_blocks)[0]
