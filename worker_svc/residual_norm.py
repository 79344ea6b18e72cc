"""The residual add after a projection and the RMSNorm before the next one, as one kernel per row block.

With 16 rows and more, each of a layer's two norms used to be three kernels: the split-K partial products summed
and added to the residual stream, each row's sum of squares, and the normed rows written for the next tensor-core
product (at the TinyLlama shape, 134 of a batch-64 step's 366 kernels, each a launch and a full pass over the
rows). Here one workgroup per row does all of it: thread t takes elements d = t, t + T, ... of the row (a warp's
loads are consecutive), adds the S partial products to the residual, writes the new residual, and keeps its share
of the sum of squares; the shares are added in shared memory in two stages (each warp's lanes, then the warps);
then each thread writes its elements normed. On devices without local memory (CPU) one thread per row runs the
same steps as two loops over the row.
"""
from __future__ import annotations

import functools

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

from worker_svc.tc_gemm import partials_at

LANES = 32      # threads per warp
MAX_WARPS = 16  # threads per row on GPUs: up to 512


def threads_for(device: str, D: int) -> int:
    """Threads per row: up to MAX_WARPS warps whose count divides D / LANES, or 1 where there is no local memory."""
    if not Device[device].renderer.has_local or D % LANES:
        return 1
    return LANES * max(w for w in range(1, MAX_WARPS + 1) if (D // LANES) % w == 0)


@functools.lru_cache(maxsize=16)
def _residual_norm_kernel(x_out: UOp, normed: UOp, x: UOp, delta: UOp, weight: UOp, eps: float, threads: int) -> UOp:
    rows, D = x.shape
    S = delta.shape[0]
    T, local = threads, threads > 1
    W = T // LANES if local else 1
    f32 = dtypes.float
    zero = UOp.const(0, dtypes.weakint)
    r = UOp.range(rows, 0)
    lane = UOp.range(LANES, 1, AxisType.WARP) if local else zero
    wp = UOp.range(W, 2, AxisType.WARP) if local and W > 1 else zero
    t = wp * LANES + lane
    outer = tuple(u for u in (r, lane, wp) if u.op is Ops.RANGE)

    if local:
        # GPU: thread t's D / T elements are few (4 at TinyLlama's D = 2048), so its loop is unrolled and every load
        # (the residual and S partials of each element) is issued at once: with one workgroup per row, a rolled loop
        # paid one memory latency per element
        ds = [jj * T + t for jj in range(D // T)]
        vs = [x[r, d] + partials_at(delta, r, d) for d in ds]
        red = UOp.placeholder((T,), f32, 1, addrspace=AddrSpace.LOCAL)  # T shares -> each warp's sum -> the row's
        red = red.after(red[t].store(_sum([v * v for v in vs])).barrier())
        red2 = UOp.placeholder((W,), f32, 2, addrspace=AddrSpace.LOCAL)
        ok = t < W
        warp_sum = _sum([red[(t * LANES + i).valid(ok)] for i in range(LANES)])
        red2 = red2.after(red2[t.valid(ok)].store(warp_sum).barrier())
        inv_rms = (_sum([red2[i] for i in range(W)]) * (1.0 / D) + eps).rsqrt()
        # rounded to the weight's dtype before the weight multiplies it, as model.rms_norm does
        stores = [x_out[r, d].store(v) for d, v in zip(ds, vs)]
        stores += [normed[r, d].store((v * inv_rms).cast(normed.dtype) * weight[d]) for d, v in zip(ds, vs)]
        done = UOp.group(*stores)
    else:
        # CPU, one thread a row: a loop that writes the new residual and sums its squares, then one that reads
        # the row back and writes it normed
        acc = UOp.placeholder((1,), f32, 0, addrspace=AddrSpace.REG)
        acc = acc.after(acc.after(*outer)[0].store(0.0))
        j = UOp.range(D, 3, AxisType.REDUCE)
        v = x[r, j] + partials_at(delta, r, j)
        pass1 = UOp.group(x_out[r, j].store(v), acc[0].store(acc.after(j)[0] + v * v)).end(j)
        inv_rms = (acc.after(pass1)[0] * (1.0 / D) + eps).rsqrt()
        j2 = UOp.range(D, 4)
        done = normed[r, j2].store((x_out.after(pass1)[r, j2] * inv_rms).cast(normed.dtype) * weight[j2]).end(j2)
    return done.end(*outer).sink(arg=KernelInfo(name=f"residual_norm_{D}_s{S}", opts_to_apply=()))


def _sum(xs: list[UOp]) -> UOp:
    return sum(xs[1:], xs[0])


def residual_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (..., D) float32, the residual stream; delta (S, rows, D) in any float dtype, S partial products of the
    projection that adds to it (S = 1 for a whole one). Returns (x + delta summed over S, in float32, shaped as x;
    rms_norm of that with `weight`, (..., D) in weight's dtype)."""
    *lead, D = x.shape
    S, rows, _ = delta.shape
    assert delta.shape[2] == D and rows * D == x.numel(), f"x {x.shape}, delta {delta.shape}"
    threads = threads_for(x.device, D)
    new_x = Tensor.empty(rows, D, dtype=dtypes.float, device=x.device)
    normed = Tensor.empty(rows, D, dtype=weight.dtype, device=x.device)
    fxn = functools.partial(_residual_norm_kernel, eps=eps, threads=threads)
    new_x, normed, *_ = Tensor.custom_kernel(new_x, normed, x.reshape(rows, D), delta, weight, fxn=fxn)
    return new_x.reshape(*lead, D), normed.reshape(*lead, D)
