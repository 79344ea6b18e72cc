"""The residual add after a projection and the RMSNorm before the next one, as one kernel per row block.

With 16 rows and more, each of a layer's two norms used to be three kernels: the split-K partial products summed
and added to the residual stream, each row's sum of squares, and the normed rows written for the next tensor-core
product (at the TinyLlama shape, 134 of a batch-64 step's 366 kernels, each a launch and a full pass over the
rows). Here one workgroup per row does all of it: thread t takes elements d = t, t + T, ... of the row (a warp's
loads are consecutive), adds the S partial products to the residual, writes the new residual, and keeps its share
of the sum of squares; the shares are added in shared memory in two stages (each warp's lanes, then the warps);
then each thread reads back its own elements of the new residual and writes them normed. On devices without local
memory (CPU) the same code runs with one thread per row.
"""
from __future__ import annotations

import functools

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

LANES = 32      # threads per warp
MAX_WARPS = 8   # threads per row on GPUs: up to 256


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
    f32, wi = dtypes.float, dtypes.weakint
    zero = UOp.const(0, wi)
    r = UOp.range(rows, 0)
    lane = UOp.range(LANES, 1, AxisType.WARP) if local else zero
    wp = UOp.range(W, 2, AxisType.WARP) if local and W > 1 else zero
    t = wp * LANES + lane
    outer = tuple(u for u in (r, lane, wp) if u.op is Ops.RANGE)

    # pass 1: new residual = residual + the S partial products, this thread's share of its sum of squares
    acc = UOp.placeholder((1,), f32, 0, addrspace=AddrSpace.REG)
    acc = acc.after(acc.after(*outer)[0].store(0.0))
    j = UOp.range(D // T, 3, AxisType.REDUCE)
    d = j * T + t
    parts = [delta[s, r, d].cast(f32) for s in range(S)]
    v = x[r, d] + sum(parts[1:], parts[0])
    pass1 = UOp.group(x_out[r, d].store(v), acc[0].store(acc.after(j)[0] + v * v)).end(j)
    sq = acc.after(pass1)[0]

    if local:  # T shares -> each warp's sum -> the row's, in shared memory
        red = UOp.placeholder((T,), f32, 1, addrspace=AddrSpace.LOCAL)
        red = red.after(red[t].store(sq).barrier())
        red2 = UOp.placeholder((W,), f32, 2, addrspace=AddrSpace.LOCAL)
        ok = t < W
        lane_sums = [red[(t * LANES + i).valid(ok)] for i in range(LANES)]
        red2 = red2.after(red2[t.valid(ok)].store(sum(lane_sums[1:], lane_sums[0])).barrier())
        total = sum((red2[i] for i in range(1, W)), red2[0])
    else:
        total = sq
    inv_rms = (total * (1.0 / D) + eps).rsqrt()

    # pass 2: this thread's own elements of the new residual (its own writes: no barrier needed), normed. Rounded
    # to the weight's dtype before the weight multiplies it, as model.rms_norm does
    j2 = UOp.range(D // T, 4)
    d2 = j2 * T + t
    xv = x_out.after(pass1)[r, d2]
    store = normed[r, d2].store((xv * inv_rms).cast(normed.dtype) * weight[d2])
    return store.end(j2).end(*outer).sink(arg=KernelInfo(name=f"residual_norm_{D}_s{S}", opts_to_apply=()))


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
