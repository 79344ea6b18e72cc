"""One-row matrix-vector kernels (worker_svc.gemv) against NumPy: the GPU code path (32 lanes a warp, shared-memory
reductions, barriers) on tinygrad's PYTHON device, which emulates workgroups; and a batch-1 forward pass that uses
them, on the CPU (one lane a workgroup), against the NumPy reference model."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor

from tests.models import build_model
from tests.reference import NumpyLlama
from tests.test_forward import BLOCK, close, run
from tests.test_paged_attention import rotate
from worker_svc.gemv import GemvPlan, gemv, gemv_qkv, kv_write_fits, plan_for


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


# (N, K, mode, plan): one warp and several, a reduction over several chunks (768 = 3 warps x 256), rows per
# workgroup 2-8, and each fused input/output
CASES = [(64, 256, "plain", GemvPlan(4, 1)), (32, 512, "norm", GemvPlan(2, 2)),
         (16, 512, "swiglu", GemvPlan(4, 1)), (32, 768, "residual", GemvPlan(8, 3))]


@pytest.mark.parametrize("N, K, mode, plan", CASES)
def test_gemv_matches_numpy_on_emulated_gpu(N, K, mode, plan):
    rng = np.random.default_rng(N + K)
    w = rng.standard_normal((N, K)).astype(np.float16)
    x = rng.standard_normal(2 * K if mode == "swiglu" else K).astype(np.float16 if mode in ("plain", "swiglu")
                                                                      else np.float32)
    g = rng.standard_normal(K).astype(np.float16)
    res = rng.standard_normal(N).astype(np.float32)
    kw = dict(norm=(Tensor(g, device="PYTHON"), 1e-5)) if mode == "norm" else {}
    if mode == "swiglu":
        kw["swiglu"] = True
    if mode == "residual":
        kw["residual"] = Tensor(res, device="PYTHON")
    got = gemv(Tensor(x, device="PYTHON"), Tensor(w, device="PYTHON"), plan, **kw).numpy().astype(np.float64)

    xf, wf = x.astype(np.float64), w.astype(np.float64)
    if mode == "norm":
        inp = xf * g / np.sqrt((xf * xf).mean() + 1e-5)
    elif mode == "swiglu":
        inp = silu(xf[:K]) * xf[K:]
    else:
        inp = xf
    want = wf @ inp + (res if mode == "residual" else 0)
    assert got.shape == (N,)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-5 if mode == "residual" else 2e-3), f"{mode}: max error {err:.1e} of the range"  # fp16 output


@pytest.mark.parametrize("device, plan", [("PYTHON", GemvPlan(4, 1)), ("CPU", GemvPlan(4, 1)), ("PYTHON", GemvPlan(8, 2))])
def test_qkv_kernel_writes_rotated_k_and_v_into_the_pool(device, plan):
    """gemv_qkv: the normed QKV product, and the token's rope(K) and V in its pool slot (nothing else written)."""
    rng = np.random.default_rng(7)
    H, KV, hd, K, pos, slot = 4, 2, 16, 512, 7, 13
    q_dim, kv_dim = H * hd, KV * hd
    N = q_dim + 2 * kv_dim
    assert kv_write_fits(plan, N, hd)
    w = rng.standard_normal((N, K)).astype(np.float16)
    x = rng.standard_normal(K).astype(np.float32)
    g = rng.standard_normal(K).astype(np.float16)
    cos, sin = (rng.standard_normal((20, hd // 2)).astype(np.float32) for _ in range(2))

    def dev(a: np.ndarray) -> Tensor:
        return Tensor(a, device=device)
    qkv, pool = gemv_qkv(dev(x), dev(w), plan, (dev(g), 1e-5), dev(np.zeros((2, 32, kv_dim), np.float16)),
                         (dev(cos), dev(sin)), dev(np.array([pos], np.int32)), dev(np.array([slot], np.int32)),
                         q_dim, hd)
    qkv, pool = qkv.numpy().astype(np.float64), pool.numpy().astype(np.float64)

    xf = x.astype(np.float64)
    want = w.astype(np.float64) @ (xf * g / np.sqrt((xf * xf).mean() + 1e-5))
    k, v = want[q_dim:q_dim + kv_dim].reshape(KV, hd), want[q_dim + kv_dim:]
    rotated = rotate(k[None], np.array([pos]), cos, sin)[0]
    for got, ref in ((qkv, want), (pool[0, slot], rotated.reshape(-1)), (pool[1, slot], v)):
        assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3  # fp16 rounding
    assert not np.delete(pool, slot, axis=1).any(), "a slot other than the token's was written"


def test_plans_split_k_into_whole_chunks():
    assert plan_for(11264, 2048) == GemvPlan(4, 8)   # one 16-byte chunk a thread
    assert plan_for(2048, 5632) == GemvPlan(4, 11)   # 5632 = 22 x 256: 11 warps, two chunks a thread
    assert plan_for(32000, 2048) == GemvPlan(4, 8)
    assert plan_for(2048, 2000) is None and plan_for(2046, 2048) is None
    assert plan_for(400, 64, lanes=1) is not None  # the CPU's one-lane form fits the demo model


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batch1_forward_with_gemv_matches_numpy(dtype, demo_checkpoint, tmp_path_factory):
    """Prefill and decode of one sequence through the one-row kernels (forced on: the CPU has no local memory, so the
    model would not pick them), including the LM head's, against the NumPy reference."""
    from shared.demo_checkpoint import build_checkpoint

    path = demo_checkpoint if dtype == "float32" else build_checkpoint(tmp_path_factory.mktemp("gemv16"),
                                                                       dtype="float16", seed=3)
    model, ref = build_model(path, num_blocks=16, max_context=128, block_size=BLOCK), NumpyLlama(path)
    model.has_local = True
    assert model.gemv_fits()
    rtol = 1e-4 if dtype == "float32" else 3e-2
    rng = np.random.default_rng(1)
    seq = [int(t) for t in rng.integers(3, model.config.vocab_size, size=12)]
    want = ref.logits(seq)
    blocks = [5, 2]
    close(run(model, [(seq[:9], 0, blocks)], T=16)[0], want[8], rtol)  # one-row prefill: its LM head
    for pos in range(9, 12):                                            # one-row decode steps
        close(run(model, [([seq[pos]], pos, blocks)], T=1)[0], want[pos], rtol)
