"""The paged KV cache pool: preallocated on the device once, written in place one slot per new token."""
from __future__ import annotations

import functools
import math

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.uop.ops import AxisType, KernelInfo

from worker_svc.tc_gemm import partials_at

NULL_BLOCK = 0
"""Block 0 is never handed to a sequence: padded rows, padded tokens and unallocated table entries point at it."""


def _write_slots_kernel(pool: UOp, qkv: UOp, rope_cos: UOp, rope_sin: UOp, positions: UOp, slots: UOp,
                        q_dim: int, head_dim: int, max_threads: int = 1) -> UOp:
    """pool[0, slots[i], :] = rope(k_i), pool[1, slots[i], :] = v_i, with k_i and v_i read from the fused QKV
    projection's row i: touches only the new tokens' slots, never the rest of the pool.

    A plain scatter or advanced setitem would make tinygrad rewrite the whole pool every step
    (../shared/notes/tinygrad-0.14.md), which is what this custom kernel exists to avoid. Rotating K here (Hugging
    Face's rotate-half layout, in fp32 like the NumPy reference) saves the kernel that would otherwise materialise
    the rotated K and V for it. On GPUs a row of a token's K or V is one workgroup of up to 256 threads; without that,
    every element was a workgroup of one thread (29 us per layer for 64 tokens on the H200)."""
    _, rows, width = pool.shape  # width = kv_dim
    tokens = qkv.shape[-2]
    threads = math.gcd(width, max_threads)
    c, i = UOp.range(2, 0), UOp.range(tokens, 1)
    j_ranges = (UOp.range(width // threads, 2),) + ((UOp.range(threads, 3, AxisType.LOCAL),) if threads > 1 else ())
    j = j_ranges[0] * threads + j_ranges[1] if threads > 1 else j_ranges[0]
    half = head_dim // 2
    d = j % head_dim
    first = d < half
    # clamped so that tinygrad knows the bounds (else it wraps the table index in a 64-bit modulo)
    pos = positions[i].cast(dtypes.weakint).maximum(0).minimum(rope_cos.shape[0] - 1)
    freq = first.where(d, d - half)
    x = partials_at(qkv, i, q_dim + c * width + j)
    partner = partials_at(qkv, i, q_dim + first.where(j + half, j - half))  # K's rotation partner
    rotated = x * rope_cos[pos, freq] + first.where(-partner, partner) * rope_sin[pos, freq]
    value = c.eq(0).where(rotated, x).cast(pool.dtype)
    store = pool[c, slots[i].cast(dtypes.weakint), j].store(value)
    return store.end(c, i, *j_ranges).sink(arg=KernelInfo(name="kv_rope_write", opts_to_apply=()))


class PagedKVCache:
    """Per layer one pool of shape (2, num_blocks * block_size, kv_heads * head_dim): K at [0], V at [1]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: DType, device: str):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # threads per workgroup of the KV write, on devices that have workgroups (not CPU)
        self._write_kernel = functools.partial(_write_slots_kernel,
                                               max_threads=256 if Device[device].renderer.has_local else 1)
        # zeros, not empty: masked attention multiplies unused slots by 0, and garbage there could be NaN
        self.pools = [Tensor.zeros(2, num_blocks * block_size, num_kv_heads * head_dim, dtype=dtype,
                                   device=device).contiguous().realize() for _ in range(num_layers)]

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.pools)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: DType) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, qkv: Tensor, q_dim: int, rope_cos: Tensor, rope_sin: Tensor, positions: Tensor,
              slots: Tensor) -> Tensor:
        """Store rope(K) and V of each token of the fused QKV rows `qkv` (tokens, q_dim + 2 * kv_dim) at `slots`
        (tokens,), K rotated for `positions` (tokens,) with the (max_context, head_dim / 2) fp32 tables. qkv may
        also be (S, tokens, q_dim + 2 * kv_dim), S partial products over K that the kernel adds up. Returns the
        layer's pool ordered after the write."""
        fxn = functools.partial(self._write_kernel, q_dim=q_dim, head_dim=self.head_dim)
        return self.pools[layer].custom_kernel(qkv, rope_cos, rope_sin, positions, slots, fxn=fxn)[0]
