"""Fused paged attention for decode (one query token per row) as ONE tinygrad custom kernel per layer.

The Tensor version in model.py gathers K and V out of the pool (two materialised copies), then runs scores, max,
exp-sum and P@V as separate kernels: about 8 launches and two full copies of the context per layer. This kernel
reads K and V in place from the paged pool through the block table and keeps everything else on chip.

Layout of the work (GPU, `Renderer.has_local`):
  * one workgroup per (row b, kv head h): the G query heads sharing that KV head reuse every K/V element loaded;
  * T threads per workgroup walk the context in chunks of C = T slots with an online ("flash") softmax:
      1. stage the chunk's K rows into shared memory with coalesced loads (thread i loads element i, i+T, ...),
      2. thread t computes the G scores of slot t from shared memory (q is staged there once, pre-scaled),
      3. every thread reads the chunk's scores to get the new running max (broadcast reads), writes p = exp(s - m)
         for its own slot, and the running sums are rescaled by exp(m_old - m_new),
      4. thread (r, d) accumulates p * V[slot, d] over the slots r, r + R, ... (V read straight from global,
         coalesced across d); the R partial sums are added through shared memory at the end.
  * masked slots (s > position, or past num_blocks * block_size) never touch memory: their loads are gated.
On CPU (no local memory, no threads) the same code runs with T = 1: "shared" buffers become register arrays and
the lanes are plain loops, so the CPU tests exercise the same algorithm the GPU runs.
"""
from __future__ import annotations

import math

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace, DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

NEG_BIG = -1e30
"""Running-max start and masked-score value: finite so that exp(m_old - m_new) never computes inf - inf."""

SMEM_BUDGET = 40 * 1024
"""Bytes of shared memory per workgroup we allow ourselves: under CUDA's 48 KiB static limit and Metal's 32 KiB+."""


def _plan(hd: int, group: int, itemsize: int, max_threads: int) -> tuple[int, int]:
    """(threads T, K row stride in shared memory) for a head size: T slots per chunk and T lanes per workgroup.

    The K row stride is padded so that it is an odd number of 32-bit words: thread t reading row t then hits bank
    t mod 32 instead of every thread hitting the same few banks."""
    kstride = hd + max(1, 4 // itemsize)
    if (kstride * itemsize // 4) % 2 == 0: kstride += max(1, 4 // itemsize)
    if max_threads <= 1: return 1, kstride
    threads = max_threads
    while threads > 1:
        ok_shape = (threads % hd == 0 or hd % threads == 0) and (group * hd) % min(threads, group * hd) == 0
        smem = (threads * kstride + group * hd) * itemsize + 4 * (2 * group * threads + group * max(1, threads // hd))
        if ok_shape and smem <= SMEM_BUDGET: return threads, kstride
        threads //= 2
    return 1, kstride


def _decode_attention_kernel(out: UOp, q: UOp, pool: UOp, tables: UOp, positions: UOp, num_blocks: UOp | int,
                             block_size: int, threads: int, kstride: int) -> UOp:
    """The kernel body: see the module docstring for the algorithm. `num_blocks` is an int or an ALU PARAM."""
    B, KV, G, hd = out.shape
    pdt: DType = pool.dtype
    f32, wi = dtypes.float32, dtypes.weakint
    T = threads
    local = T > 1
    C = max(T, 16)                        # slots per chunk (CPU: 16 slots per loop trip)
    Dl = min(T, hd)                       # lanes across head_dim in the P@V phase
    R, KD = T // Dl, hd // Dl             # slot groups in P@V, head dims per lane
    space = AddrSpace.LOCAL if local else AddrSpace.REG
    ids = iter(range(100))

    def rng(n, kind=AxisType.LOOP):
        """A loop, or the constant 0 when it has one trip: keeps the CPU (T = 1) code free of empty loops."""
        return UOp.range(n, next(ids), kind) if not isinstance(n, int) or n > 1 else UOp.const(0, wi)

    def end(x: UOp, *rs: UOp) -> UOp: return x.end(*[r for r in rs if r.op is Ops.RANGE])

    def sync(*stores: UOp) -> UOp:
        """Everything stored so far is visible to every lane: a workgroup barrier on GPUs, ordering only on CPU."""
        g = UOp.group(*stores)
        return g.barrier() if local else g

    b, h = UOp.range(B, next(ids)), UOp.range(KV, next(ids))
    # lane = r * Dl + dl as two LOCAL ranges, dl first: tinygrad would split a single lane range used as lane % Dl
    # and lane // Dl itself, but with the slot group r as threadIdx.x, which puts lanes 64 apart into one warp
    dl = UOp.range(Dl, next(ids), AxisType.LOCAL) if local else UOp.const(0, wi)
    r = UOp.range(R, next(ids), AxisType.LOCAL) if R > 1 else UOp.const(0, wi)
    lane = r * Dl + dl
    outer = tuple(x for x in (b, h, dl, r) if x.op is Ops.RANGE)
    S = num_blocks * block_size
    pool_blocks = pool.shape[1] // block_size
    scale = 1.0 / math.sqrt(hd)
    nchunks = (S + (C - 1)) // C
    limit = (positions[b].cast(wi) + 1).minimum(S)  # slot s is visible iff s < limit

    def row_of(s: UOp, ok: UOp) -> UOp:
        """Pool row of context slot s through the block table; gated (no load) when the slot is masked."""
        # the clamp is free and bounds the row: without it tinygrad wraps every pool index in a 64-bit modulo
        blk = tables[b, (s // block_size).valid(ok)].cast(wi).maximum(0).minimum(pool_blocks - 1)
        return blk * block_size + s % block_size

    # shared (GPU) / register (CPU) buffers
    q_s = UOp.placeholder((G * hd,), pdt, 0, addrspace=space)     # q rounded to the pool dtype
    k_s = UOp.placeholder((C * kstride,), pdt, 1, addrspace=space)
    s_s = UOp.placeholder((G * C,), f32, 2, addrspace=space)        # scores of the chunk
    p_s = UOp.placeholder((G * C,), f32, 3, addrspace=space)        # exp(score - running max) of the chunk
    # per-lane state, in registers
    m_r = UOp.placeholder((G,), f32, 10, addrspace=AddrSpace.REG)   # running max
    l_r = UOp.placeholder((G,), f32, 11, addrspace=AddrSpace.REG)   # running sum of p over this lane's slots
    a_r = UOp.placeholder((G * KD,), f32, 12, addrspace=AddrSpace.REG)  # running sum of p * v, this lane's dims
    sc_r = UOp.placeholder((G,), f32, 13, addrspace=AddrSpace.REG)  # dot-product accumulators
    mx_r = UOp.placeholder((G,), f32, 14, addrspace=AddrSpace.REG)  # chunk max
    pa_r = UOp.placeholder((G * KD,), f32, 15, addrspace=AddrSpace.REG)  # chunk's p * v sums
    pl_r = UOp.placeholder((G,), f32, 16, addrspace=AddrSpace.REG)  # chunk's p sums

    # q rounded to the pool dtype like the Tensor code (q.cast(keys.dtype)); storing it as such is what forces the
    # rounding: tinygrad folds a float -> half -> float cast chain away
    iq = rng((G * hd + T - 1) // T)
    qi = iq * T + lane
    q_ok = qi < G * hd
    q_val = q[b, h, (qi // hd).valid(q_ok), qi % hd].cast(pdt)
    q_ready = sync(end(q_s[qi.valid(q_ok)].store(q_val), iq))
    q_sh = q_s.after(q_ready)

    # running state
    ia = rng(G * KD)
    st_init = UOp.group(*[m_r.after(*outer)[g].store(NEG_BIG) for g in range(G)],
                        *[l_r.after(*outer)[g].store(0.0) for g in range(G)],
                        end(a_r.after(*outer)[ia].store(0.0), ia))
    m_st, l_st, a_st = m_r.after(st_init), l_r.after(st_init), a_r.after(st_init)

    ch = UOp.range(nchunks, next(ids), AxisType.LOOP)
    base = ch * C

    # 1. stage the chunk's K rows (coalesced: consecutive lanes load consecutive elements of a row)
    ik = rng(C * hd // T)
    kidx = ik * T + lane
    kc, ke = kidx // hd, kidx % hd
    k_ok = base + kc < limit
    k_val = pool[0, row_of(base + kc, k_ok).valid(k_ok), h * hd + ke]
    k_ready = sync(end(k_s[kc * kstride + ke].store(k_val), ik))
    k_sh = k_s.after(k_ready)

    # 2. scores of this lane's slots c = j*T + lane, all G query heads from one read of each K element
    j = rng(C // T)
    c = j * T + lane
    e = UOp.range(hd, next(ids), AxisType.REDUCE)
    sc0 = sc_r.after(ch, k_ready, *([j] if j.op is Ops.RANGE else []))
    sc1 = sc0.after(UOp.group(*[sc0[g].store(0.0) for g in range(G)]))
    k_e = k_sh[c * kstride + e].cast(f32)
    dot = UOp.group(*[sc1[g].store(sc1.after(e)[g] + q_sh[g * hd + e].cast(f32) * k_e) for g in range(G)]).end(e)
    s_ok = base + c < limit
    s_ready = sync(end(UOp.group(*[s_s[g * C + c].store(s_ok.where(sc1.after(dot)[g] * scale, NEG_BIG))
                                   for g in range(G)]), j))
    s_sh = s_s.after(s_ready)

    # 3. new running max (every lane reads all the chunk's scores: broadcast reads), p for this lane's slots
    m_old = [m_st.after(ch)[g] for g in range(G)]
    mx0 = mx_r.after(ch, s_ready)
    mx1 = mx0.after(UOp.group(*[mx0[g].store(m_old[g]) for g in range(G)]))
    ic = UOp.range(C, next(ids), AxisType.REDUCE)
    mx_done = UOp.group(*[mx1[g].store(mx1.after(ic)[g].maximum(s_sh[g * C + ic])) for g in range(G)]).end(ic)
    m_new = [mx1.after(mx_done)[g] for g in range(G)]
    alpha = [(m_old[g] - m_new[g]).exp() for g in range(G)]
    j2 = rng(C // T)
    c2 = j2 * T + lane
    p_ok = base + c2 < limit
    p_ready = sync(end(UOp.group(*[p_s[g * C + c2].store(p_ok.where((s_sh[g * C + c2] - m_new[g]).exp(), 0.0))
                                   for g in range(G)]), j2))
    p_sh = p_s.after(p_ready)

    # 4. P @ V: lane (r, dl) sums p * v over slots r, r + R, ... for head dims dl + k*Dl
    iv = UOp.range(C // R, next(ids), AxisType.REDUCE)
    cv = iv * R + r
    v_ok = base + cv < limit
    v_row = row_of(base + cv, v_ok)
    kd = rng(KD)
    pa0 = pa_r.after(ch, p_ready)
    ia2 = rng(G * KD)
    pa1 = pa0.after(end(pa0[ia2].store(0.0), ia2))
    pl0 = pl_r.after(ch, p_ready)
    pl1 = pl0.after(UOp.group(*[pl0[g].store(0.0) for g in range(G)]))
    p_v = [p_sh[g * C + cv] for g in range(G)]
    v_val = pool[1, v_row.valid(v_ok), h * hd + dl + kd * Dl].cast(f32)
    pv = end(UOp.group(*[pa1[g * KD + kd].store(pa1.after(iv, kd)[g * KD + kd] + p_v[g] * v_val) for g in range(G)]),
             kd)
    psum = UOp.group(*[pl1[g].store(pl1.after(iv)[g] + p_v[g]) for g in range(G)])
    pv_done = UOp.group(pv, psum).end(iv)
    pa2, pl2 = pa1.after(pv_done), pl1.after(pv_done)

    # fold the chunk into the running state
    kd2 = rng(KD)
    chunk_done = UOp.group(
        *[m_st[g].store(m_new[g]) for g in range(G)],
        *[l_st[g].store(l_st.after(ch)[g] * alpha[g] + pl2[g]) for g in range(G)],
        end(UOp.group(*[a_st[g * KD + kd2].store(a_st.after(ch)[g * KD + kd2] * alpha[g] + pa2[g * KD + kd2])
                        for g in range(G)]), kd2)).end(ch)
    a_fin, l_fin = a_st.after(chunk_done), l_st.after(chunk_done)

    kd3 = rng(KD)
    if R == 1:
        stores = [out[b, h, g, dl + kd3 * Dl].store(a_fin[g * KD + kd3] / l_fin[g].maximum(1e-30)) for g in range(G)]
        done = end(UOp.group(*stores), kd3)
    else:
        # add the R slot groups' partial sums through shared memory: the scores buffer is free by now (its last
        # readers passed the p barrier), and a small separate buffer takes the p sums
        red_a, red_l = s_s, UOp.placeholder((R * G,), f32, 4, addrspace=space)
        parts = sync(*[red_a[(r * G + g) * hd + dl].store(a_fin[g]) for g in range(G)],
                     *[red_l[(r * G + g).valid(dl.eq(0))].store(l_fin[g]) for g in range(G)])
        red_a, red_l = red_a.after(parts), red_l.after(parts)
        stores = []
        for g in range(G):
            acc = sum((red_a[(i * G + g) * hd + dl] for i in range(1, R)), red_a[g * hd + dl])
            lsum = sum((red_l[i * G + g] for i in range(1, R)), red_l[g])
            stores.append(out[b, h, g, dl.valid(lane < Dl)].store(acc / lsum.maximum(1e-30)))
        done = UOp.group(*stores)
    return done.end(*outer).sink(arg=KernelInfo(name=f"paged_decode_attn_{G}x{hd}", opts_to_apply=()))


def _custom_kernel_with_var(tensors: list[Tensor], fxn, num_blocks: UOp | int) -> list[Tensor]:
    """Tensor.custom_kernel, plus a bound symbolic variable the kernel body may use.

    Tensor.custom_kernel only takes tensors; a bound Variable must be a source of the CALL (that is how its value
    reaches the launch, see engine/realize.get_call_var_uops) and appear in the body as an ALU PARAM of the same
    name."""
    srcs = [t.uop for t in tensors]
    placeholders = [UOp.placeholder_like(s, slot=i) for i, s in enumerate(srcs)]
    if isinstance(num_blocks, int):
        call = fxn(*placeholders, num_blocks).call(*srcs)
    else:
        var = num_blocks.src[0] if num_blocks.is_bound_var else num_blocks
        assert var.is_variable, f"num_blocks must be an int or a (bound) UOp.variable, got {num_blocks}"
        call = fxn(*placeholders, var.replace(op=Ops.PARAM)).call(*srcs, num_blocks)
    return [Tensor(s.after(call)) for s in srcs]


def paged_decode_attention(q: Tensor, pool: Tensor, block_tables: Tensor, positions: Tensor, num_blocks: UOp | int,
                           block_size: int, num_kv_heads: int, head_dim: int, max_threads: int | None = None) -> Tensor:
    """softmax(q.k / sqrt(hd)) @ v over the visible slots of each row, read in place from the paged pool.

    q: (B, KV, G, hd) any float dtype; pool: (2, rows, KV * hd) with K at [0], V at [1]; block_tables: (B, W) int32
    (only the first num_blocks columns are read); positions: (B,) int32, slot s is visible iff s <= positions[b].
    Returns (B, KV, G, hd) float32. One kernel: nothing is gathered or materialised."""
    B, KV, G, hd = q.shape
    assert (KV, hd) == (num_kv_heads, head_dim), f"q {q.shape} vs {num_kv_heads=} {head_dim=}"
    assert pool.shape[0] == 2 and pool.shape[2] == KV * hd, f"pool {pool.shape}"
    assert block_tables.shape[0] == B and positions.shape == (B,)
    if max_threads is None: max_threads = 128 if Device[pool.device].renderer.has_local else 1
    threads, kstride = _plan(hd, G, pool.dtype.itemsize, max_threads)
    out = Tensor.empty(B, KV, G, hd, dtype=dtypes.float32, device=pool.device)
    ins = [out, q.contiguous(), pool, block_tables.cast(dtypes.int32).contiguous(), positions.cast(dtypes.int32).contiguous()]

    def fxn(o: UOp, qq: UOp, p: UOp, t: UOp, pos: UOp, nb: UOp | int) -> UOp:
        return _decode_attention_kernel(o, qq, p, t, pos, nb, block_size, threads, kstride)
    return _custom_kernel_with_var(ins, fxn, num_blocks)[0]
