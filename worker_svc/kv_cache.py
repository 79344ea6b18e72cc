"""The paged KV cache pool: preallocated on the device once, written in place one slot per new token."""
from __future__ import annotations

import functools
import math

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.uop.ops import AxisType, KernelInfo

NULL_BLOCK = 0
"""Block 0 is never handed to a sequence: padded rows, padded tokens and unallocated table entries point at it."""


def _write_slots_kernel(pool: UOp, new_kv: UOp, slots: UOp, max_threads: int = 1) -> UOp:
    """pool[c, slots[i], j] = new_kv[c, i, j]: touches only the new tokens' slots, never the rest of the pool.

    A plain scatter or advanced setitem would make tinygrad rewrite the whole pool every step
    (../shared/notes/tinygrad-0.14.md), which is what this custom kernel exists to avoid. On GPUs a row of a
    token's K or V is one workgroup of up to 256 threads; without that, every element was a workgroup of one
    thread (29 us per layer for 64 tokens on the H200)."""
    kv, tokens, width = new_kv.shape
    threads = math.gcd(width, max_threads)
    c, i = UOp.range(kv, 0), UOp.range(tokens, 1)
    j_ranges = (UOp.range(width // threads, 2),) + ((UOp.range(threads, 3, AxisType.LOCAL),) if threads > 1 else ())
    j = j_ranges[0] * threads + j_ranges[1] if threads > 1 else j_ranges[0]
    store = pool[c, slots[i].cast(dtypes.weakint), j].store(new_kv[c, i, j])
    return store.end(c, i, *j_ranges).sink(arg=KernelInfo(name="kv_write", opts_to_apply=()))


class PagedKVCache:
    """Per layer one pool of shape (2, num_blocks * block_size, kv_heads * head_dim): K at [0], V at [1]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: DType, device: str):
        self.num_blocks, self.block_size = num_blocks, block_size
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

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> Tensor:
        """Store k, v (tokens, kv_dim) at `slots` (tokens,) and return the layer's pool ordered after the write."""
        new_kv = Tensor.stack(k, v).cast(self.pools[layer].dtype)
        return self.pools[layer].custom_kernel(new_kv, slots, fxn=self._write_kernel)[0]

    def gather(self, pool: Tensor, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the blocks in `block_tables` (B, n): each (B, n * block_size, kv_heads, head_dim)."""
        b, n = block_tables.shape
        paged = pool.reshape(2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        shape = (b, n * self.block_size, self.num_kv_heads, self.head_dim)
        return paged[0][block_tables].reshape(shape), paged[1][block_tables].reshape(shape)
