"""The residual-add-and-norm kernel (worker_svc.residual_norm) against NumPy: the GPU code path (warps of 32 lanes,
the two-stage shared-memory sum, barriers) on tinygrad's PYTHON device, which emulates workgroups, and the
one-thread-a-row path on the CPU. The model's use of it (16 rows and more) is covered by tests/test_forward.py."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor

from worker_svc.residual_norm import residual_norm, threads_for

# (device, lead dims of x, D, partial products S, their dtype): 16 warps a row with 2 elements a thread, one warp,
# a whole fp16 product
CASES = [("PYTHON", (3,), 1024, 4, np.float32), ("PYTHON", (2, 2), 32, 1, np.float16),
         ("CPU", (5,), 64, 2, np.float32), ("CPU", (2, 3), 48, 1, np.float16)]


@pytest.mark.parametrize("device, lead, D, S, dtype", CASES)
def test_residual_norm_matches_numpy(device, lead, D, S, dtype):
    rng = np.random.default_rng(D + S)
    rows = int(np.prod(lead))
    x = rng.standard_normal((*lead, D)).astype(np.float32)
    delta = rng.standard_normal((S, rows, D)).astype(dtype)
    g = rng.standard_normal(D).astype(np.float16)
    new_x, normed = residual_norm(Tensor(x, device=device), Tensor(delta, device=device), Tensor(g, device=device),
                                  1e-5)
    new_x, normed = new_x.numpy(), normed.numpy()

    want_x = x + delta.astype(np.float64).sum(0).reshape(x.shape)
    want_n = want_x / np.sqrt((want_x * want_x).mean(-1, keepdims=True) + 1e-5) * g.astype(np.float64)
    assert new_x.shape == x.shape and new_x.dtype == np.float32
    assert normed.shape == x.shape and normed.dtype == np.float16
    assert np.abs(new_x - want_x).max() < 1e-5 * np.abs(want_x).max()
    assert np.abs(normed - want_n).max() < 4e-3 * np.abs(want_n).max()  # two fp16 roundings


def test_gpu_rows_take_up_to_sixteen_warps():
    assert threads_for("PYTHON", 2048) == 512 and threads_for("PYTHON", 544) == 32  # 17 warps wide: one warp
    assert threads_for("PYTHON", 96) == 96 and threads_for("PYTHON", 48) == 1 and threads_for("CPU", 2048) == 1
