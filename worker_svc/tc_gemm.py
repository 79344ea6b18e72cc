"""Matrix products x (M, K) @ w (N, K).T on the GPU's tensor cores as one tinygrad custom kernel, fp16 in, fp32
accumulate: the projections of decode batches of 16 rows and more and of every prefill.

tinygrad's own tensor-core kernels load each mma operand with scattered 4-byte loads, so at 64 rows the batch's
projections read their weights at 0.3-0.9 TB/s of the H200's 4.8. Here each lane loads 8 consecutive halves of
a row at once, and K is permuted inside each 32-wide chunk so that those 8 values are exactly the lane's share of
two mma instructions: an mma sums over its 16 k positions in any order, so any permutation applied to both
operands alike gives the same product. Lane (g, t) of a warp (g = lane // 4, t = lane % 4) loads k = 8t .. 8t+7
of the chunk for rows g and g + 8 of each 16-row A tile and for row g of each 8-row tile of W, and feeds
positions 4s .. 4s+3 of those to the s-th mma (s = 0, 1) where the PTX layout of m16n8k16 expects logical k in
{2t, 2t+1, 2t+8, 2t+9}.

Work layout: a warp computes (16 m_tiles) x (8 n_tiles) outputs over K / split; `warps` warps of a workgroup take
neighbouring column tiles of the same rows, so they read the same activations: from the L1 cache, or with a
`staged` plan from shared memory, where the workgroup's threads put each chunk of those rows once (every warp's
own loads of them were L1/L2 traffic that grew with the warps; staged plans measured 10-32% faster at 64 rows and
for the down projection at 128, and the same elsewhere). With split > 1
the kernel writes split partial products in fp32 (split-K: more warps for few rows): `tc_project` sums them in a
second kernel, `tc_partials` leaves them to the kernel that reads the product (the model's consumers add them up).
Only the CUDA m16n8k16 fp16 layout is written; elsewhere (CPU, Metal) `supports` is false and the model keeps
tinygrad's own products. tinygrad's PYTHON device emulates this layout (DEV=PYTHON::sm_80), which is how the CPU
tests check the kernel against NumPy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace, DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

MMA = (8, 16, 16)  # tinygrad's (N, M, K) of PTX mma.m16n8k16
CHUNK = 32         # K per loop iteration: two mma steps


@dataclass(frozen=True)
class GemmPlan:
    """One warp computes (16 * m_tiles) x (8 * n_tiles) outputs over K / split; `warps` warps per workgroup;
    `unroll` chunks of K per loop iteration (their loads are issued together: more bytes in flight per warp);
    `staged`: the workgroup loads each chunk of its activation rows into shared memory once, for all its warps,
    instead of every warp loading them from the L1/L2 caches (see `_gemm_kernel`)."""
    m_tiles: int
    n_tiles: int
    warps: int
    split: int
    unroll: int = 1
    staged: bool = False

    def fits(self, M: int, K: int, N: int) -> bool:
        return (M % (16 * self.m_tiles) == 0 and N % (8 * self.n_tiles * self.warps) == 0
                and K % (CHUNK * self.split * self.unroll) == 0)

    def __str__(self) -> str:
        unroll = f"u{self.unroll}" if self.unroll > 1 else ""
        return f"m{self.m_tiles}n{self.n_tiles}w{self.warps}s{self.split}{unroll}{'l' if self.staged else ''}"


# Best plans of `python -m bench.gemm --plans` on an H200 (bench/results/h200-gemm-plans-2026-11-28.log), for the
# TinyLlama projections (K, N) at the default buckets' row counts; 1.6-3.4x faster than tinygrad's kernels there.
# Six were replaced by an unrolled or resplit neighbour that measured 3-20% faster in `--around-measured --unrolls
# 1,2,4` (bench/results/h200-gemm-unroll-2026-11-28.log). Other shapes get `heuristic_plan`, within 1.5x of the best
# (1.12x on geometric mean) on the first sweep.
MEASURED_PLANS: dict[tuple[int, int, int], GemmPlan] = {
    (16, 5632, 2048): GemmPlan(1, 2, 1, 4, 2), (16, 2048, 11264): GemmPlan(1, 4, 2, 8),
    (16, 2048, 2560): GemmPlan(1, 2, 4, 8, 2),
    # staged plans: 10-32% faster than the unstaged ones they replace, timed in the same rounds with warm clocks
    # (bench/results/h200-s6-gemm-staged-rounds.log; O at 64 rows: as fast as the first sweep's best, 15.0 us;
    # at 128 rows QKV, O and gate+up kept theirs: within 3%)
    (64, 5632, 2048): GemmPlan(4, 2, 4, 8, 2, staged=True), (64, 2048, 11264): GemmPlan(4, 4, 4, 4, 2, staged=True),
    (64, 2048, 2560): GemmPlan(4, 2, 8, 8, 2, staged=True),
    (128, 5632, 2048): GemmPlan(4, 2, 8, 8, 2, staged=True), (128, 2048, 11264): GemmPlan(2, 2, 1, 1, 2),
    (128, 2048, 2560): GemmPlan(2, 8, 2, 4, 4),
    (256, 5632, 2048): GemmPlan(8, 4, 1, 8, 2), (256, 2048, 11264): GemmPlan(4, 4, 4, 1),
    (2048, 5632, 2048): GemmPlan(4, 4, 1, 1), (2048, 2048, 11264): GemmPlan(4, 4, 4, 1),
    (2048, 2048, 2560): GemmPlan(4, 4, 2, 1),
    # the O projection (K = N = 2048): bench/results/h200-s6-gemm-o.log (the heuristic: 14.5-104 us, up to 1.5x)
    (16, 2048, 2048): GemmPlan(1, 4, 2, 8), (64, 2048, 2048): GemmPlan(2, 2, 4, 8, 2, staged=True),
    (128, 2048, 2048): GemmPlan(2, 2, 2, 8), (256, 2048, 2048): GemmPlan(4, 8, 2, 8),
    (2048, 2048, 2048): GemmPlan(4, 8, 2, 1),
}
TARGET_WARPS = 1024  # enough warps to keep every SM's loads in flight (H100/H200: 132 SMs)


def heuristic_plan(M: int, K: int, N: int) -> GemmPlan | None:
    """4x4 tiles of 16x8 (64 rows by 32 columns a warp), 4 warps a workgroup; then, until the grid has
    TARGET_WARPS warps: split K up to 8 ways, then narrower tiles. None where no plan fits (M not a multiple of
    16, N of 32, K of 32)."""
    if M % 16 or M == 0:
        return None
    m, n, s, warps = 4, 4, 1, 4
    while M % (16 * m):
        m //= 2
    while n > 1 and N % (8 * n * warps):
        n //= 2
    while warps > 1 and N % (8 * n * warps):
        warps //= 2

    def grid() -> int:
        return (M // (16 * m)) * (N // (8 * n)) * s
    while grid() < TARGET_WARPS:
        if s < 8 and K % (CHUNK * s * 2) == 0:
            s *= 2
        elif n > 2:
            n //= 2
        elif m > 2:
            m //= 2
        else:
            break
    plan = GemmPlan(m, n, warps, s)
    return plan if plan.fits(M, K, N) else None


def plan_for(M: int, K: int, N: int) -> GemmPlan | None:
    """The plan for an (M x K) @ (K x N) product: the measured one for the default shapes, else the heuristic."""
    plan = MEASURED_PLANS.get((M, K, N))
    return plan if plan is not None and plan.fits(M, K, N) else heuristic_plan(M, K, N)


def supports(device: str) -> bool:
    """Whether this device's renderer has the fp16 m16n8k16 tensor core this kernel is written for."""
    tcs = getattr(Device[device].renderer, "tensor_cores", None) or []
    return any(tc.dims == MMA and tc.dtype_in == dtypes.half and tc.dtype_out == dtypes.float for tc in tcs)


# memoised like paged_attention's kernel: the layers of a graph build the same kernel from the same (hash-consed)
# placeholders, and building one with 32 mma takes milliseconds of Python
@functools.lru_cache(maxsize=64)
def _gemm_kernel(out: UOp, x: UOp, w: UOp, plan: GemmPlan, device: str, stage_dtype: DType | None = None) -> UOp:
    M, K = x.shape
    N = w.shape[0]
    TM, TN, WARPS, S, U = plan.m_tiles, plan.n_tiles, plan.warps, plan.split, plan.unroll
    Ks = K // S
    zero = UOp.const(0, dtypes.weakint)
    ids = iter(range(64))
    nb = UOp.range(N // (8 * TN * WARPS), next(ids))
    mb = UOp.range(M // (16 * TM), next(ids))
    sp = UOp.range(S, next(ids)) if S > 1 else zero
    # WARP ranges become threads like LOCAL ones but are never split (see paged_attention): lane is threadIdx.x
    lane = UOp.range(32, next(ids), AxisType.WARP)
    wp = UOp.range(WARPS, next(ids), AxisType.WARP) if WARPS > 1 else zero
    outer = tuple(r for r in (nb, mb, sp, lane, wp) if r.op is Ops.RANGE)
    g, t = lane // 4, lane % 4
    n0, m0 = (nb * WARPS + wp) * (8 * TN), mb * (16 * TM)

    acc = UOp.placeholder((TM * TN * 4,), dtypes.float, 0, addrspace=AddrSpace.REG)
    acc = acc.after(UOp.group(*[acc.after(*outer)[i].store(0.0) for i in range(TM * TN * 4)]))
    kk = UOp.range(Ks // (CHUNK * U), next(ids), AxisType.REDUCE)
    c = [[UOp.stack(*[acc.after(kk)[(i * TN + j) * 4 + e] for e in range(4)]) for j in range(TN)] for i in range(TM)]
    if plan.staged:
        # the iteration's U chunks of the workgroup's 16 * TM activation rows, laid out [chunk][row][t][8 halves]:
        # 16 bytes a thread and pass, consecutive threads on consecutive bytes (conflict-free stores), and a
        # warp's fragment reads (rows g, t = 0..3 of 16 bytes) cover all 32 banks per 8 lanes (conflict-free).
        # Two buffers, iteration kk in buffer kk % 2: one barrier an iteration. A warp writes buffer kk % 2 again
        # at kk + 2 only after the barrier of kk + 1, which every warp reaches after its reads of kk
        BM = 16 * TM
        pieces, threads = U * BM * 4, 32 * WARPS
        sdt = stage_dtype or x.dtype
        a_s = UOp.placeholder((2 * pieces * 8,), sdt, 1, addrspace=AddrSpace.LOCAL)
        buf = (kk % 2) * (pieces * 8)
        tid = wp * 32 + lane
        stage = []
        for pp in range((pieces + threads - 1) // threads):
            p = pp * threads + tid
            ok = p < pieces if pieces % threads else None
            uu, row, q = p // (BM * 4), (p // 4) % BM, p % 4
            k = sp * Ks + (kk * U + uu) * CHUNK + q * 8
            for e in range(8):
                at = buf + p * 8 + e
                stage.append(a_s[at if ok is None else at.valid(ok)].store(x[m0 + row, k + e].cast(sdt)))
        a_sh = a_s.after(UOp.group(*stage).barrier())
    for uu in range(U):
        k0 = sp * Ks + (kk * U + uu) * CHUNK + t * 8
        # a[i][h][u]: row g + 8h of A tile i, k = k0 + u; b[j][u]: row g of W tile j
        if plan.staged:
            a = [[[a_sh[buf + ((uu * BM + i * 16 + h * 8 + g) * 4 + t) * 8 + u].cast(x.dtype) for u in range(8)]
                  for h in range(2)] for i in range(TM)]
        else:
            a = [[[x[m0 + i * 16 + h * 8 + g, k0 + u] for u in range(8)] for h in range(2)] for i in range(TM)]
        b = [[w[n0 + j * 8 + g, k0 + u] for u in range(8)] for j in range(TN)]
        for s in range(2):
            for i in range(TM):
                # PTX A fragment element e: k bit 0 = e & 1, row + 8 if e & 2, k + 8 if e & 4
                a_in = UOp.stack(*[a[i][(e >> 1) & 1][4 * s + ((e >> 2) & 1) * 2 + (e & 1)] for e in range(8)])
                for j in range(TN):
                    # B element e: k bit 0 = e & 1, k + 8 if e & 2
                    b_in = UOp.stack(*[b[j][4 * s + e] for e in range(4)])
                    c[i][j] = UOp.wmma(a_in, b_in, c[i][j], MMA, device, 32)
    done = UOp.group(*[acc[(i * TN + j) * 4 + e].store(c[i][j].index(e))
                       for i in range(TM) for j in range(TN) for e in range(4)]).end(kk)
    fin = acc.after(done)
    stores = []
    for i in range(TM):
        for j in range(TN):
            for e in range(4):  # C element e: column 2t + (e & 1), row g + 8 if e & 2
                row, col = m0 + i * 16 + g + (e // 2) * 8, n0 + j * 8 + t * 2 + e % 2
                dst = out[sp, row, col] if S > 1 else out[row, col]
                stores.append(dst.store(fin[(i * TN + j) * 4 + e].cast(out.dtype)))
    return UOp.group(*stores).end(*outer).sink(arg=KernelInfo(name=f"tc_gemm_{N}_{K}_{plan}", opts_to_apply=()))


def partials_at(buf: UOp, row: UOp, col: UOp) -> UOp:
    """In a kernel body, element (row, col) of a product in fp32: buf[row, col] for a whole (M, N) product, or the
    sum over S of buf[:, row, col] for `tc_partials`' (S, M, N) partial products. How the kernels that read a
    product (the K/V write, attention, worker_svc.residual_norm) add up its partials: no kernel of its own does."""
    if len(buf.shape) == 2:
        return buf[row, col].cast(dtypes.float)
    parts = [buf[s, row, col].cast(dtypes.float) for s in range(buf.shape[0])]
    return sum(parts[1:], parts[0])


def tc_partials(x: Tensor, w: Tensor, plan: GemmPlan) -> Tensor:
    """x (M, K) @ w.T for w (N, K), both fp16, left as plan.split partial products over K: (split, M, N) in float32
    with a split, else (1, M, N) in x's dtype. For a consumer that adds them up itself (model.residual_norm)."""
    M, K = x.shape
    N = w.shape[0]
    assert plan.fits(M, K, N), f"{plan} does not fit {M}x{K}x{N}"
    device = Device[x.device].renderer.target.device
    shape = (plan.split, M, N) if plan.split > 1 else (M, N)
    out = Tensor.empty(*shape, dtype=dtypes.float if plan.split > 1 else x.dtype, device=x.device)
    # tinygrad's PYTHON device (the CPU tests' emulation) lowers half local buffers in a way 0.14.0's UOp verifier
    # rejects: there a staged plan keeps the halves in float shared memory (exactly), with the same layout
    stage_dtype = dtypes.float if plan.staged and x.device.split(":")[0] == "PYTHON" else None
    out = out.custom_kernel(x, w, fxn=functools.partial(_gemm_kernel, plan=plan, device=device,
                                                        stage_dtype=stage_dtype))[0]
    return out.reshape(plan.split, M, N)


def tc_project(x: Tensor, w: Tensor, plan: GemmPlan) -> Tensor:
    """x (..., K) @ w.T for w (N, K), both fp16: the result (..., N) in x's dtype."""
    *lead, K = x.shape
    parts = tc_partials(x.reshape(math.prod(lead), K), w, plan)
    out = parts.sum(0).cast(x.dtype) if plan.split > 1 else parts[0]
    return out.reshape(*lead, w.shape[0])
