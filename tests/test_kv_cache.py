"""The KV write kernel (worker_svc.kv_cache) against NumPy: rope(K) and V of each token in its slot and nothing else,
from whole QKV rows and from partial products of them (what the tensor-core products of 16 rows and more leave),
on the CPU and on the PYTHON device (workgroups of threads)."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor, dtypes

from tests.test_paged_attention import rotate
from worker_svc.kv_cache import PagedKVCache


@pytest.mark.parametrize("device, parts", [("CPU", 0), ("CPU", 3), ("PYTHON", 2)])
def test_write_stores_rotated_k_and_v_in_the_slots(device, parts):
    KV, hd, H, blocks, bs = 2, 8, 4, 6, 4
    q_dim, kv_dim = H * hd, KV * hd
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((3, q_dim + 2 * kv_dim)).astype(np.float32)
    slots, positions = np.array([5, 9, 22], np.int32), np.array([0, 7, 3], np.int32)
    angles = np.outer(np.arange(16), rng.uniform(0.01, 1.0, hd // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    given = qkv
    if parts:
        split = rng.standard_normal((parts - 1, *qkv.shape)).astype(np.float32)
        given = np.concatenate([split, (qkv - split.sum(0))[None]])
    cache = PagedKVCache(1, blocks, bs, KV, hd, dtypes.float32, device)
    pool = cache.write(0, Tensor(given, device=device), q_dim, Tensor(cos, device=device), Tensor(sin, device=device),
                       Tensor(positions, device=device), Tensor(slots, device=device)).numpy()

    k = qkv[:, q_dim:q_dim + kv_dim].reshape(3, KV, hd).astype(np.float64)
    want = np.zeros((2, blocks * bs, kv_dim))
    want[0, slots] = rotate(k, positions, cos, sin).reshape(3, kv_dim)
    want[1, slots] = qkv[:, q_dim + kv_dim:]
    np.testing.assert_allclose(pool, want, rtol=1e-5, atol=1e-5)
