"""The custom tensor-core product (worker_svc.tc_gemm) against NumPy on tinygrad's PYTHON device, which emulates
CUDA's m16n8k16 tensor core lane by lane (DEV=PYTHON::sm_80, read once at import: so in a subprocess), and its
plan rules."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from shared.processes import ROOT
from worker_svc.tc_gemm import MEASURED_PLANS, GemmPlan, heuristic_plan, plan_for

# (lead dims of x, K, N, plan): one tile and several per warp, several warps, split K, a row count of 16, two chunks
# of K per loop iteration (alone and with split K); activations staged in shared memory (several warps and tiles,
# more threads than 16-byte pieces to stage, with split K and unroll, several loop iterations: both buffers)
CASES = [((32,), 64, 64, GemmPlan(2, 2, 2, 1)), ((2, 8), 128, 96, GemmPlan(1, 3, 2, 2)),
         ((64,), 64, 32, GemmPlan(4, 1, 2, 2)), ((16,), 256, 64, GemmPlan(1, 2, 1, 8)),
         ((16,), 128, 32, GemmPlan(1, 2, 2, 1, 2)), ((32,), 256, 32, GemmPlan(2, 1, 1, 2, 2)),
         ((32,), 96, 64, GemmPlan(2, 2, 2, 1, staged=True)), ((16,), 64, 64, GemmPlan(1, 2, 4, 1, staged=True)),
         ((32,), 256, 32, GemmPlan(2, 1, 2, 2, 2, staged=True))]

EMULATED = """
import json, sys
import numpy as np
from tinygrad import Tensor
from worker_svc.tc_gemm import GemmPlan, supports, tc_project
assert supports("PYTHON")
rng = np.random.default_rng(0)
errors = []
for lead, K, N, plan in json.loads(sys.argv[1]):
    x = rng.standard_normal((*lead, K)).astype(np.float16)
    w = rng.standard_normal((N, K)).astype(np.float16)
    got = tc_project(Tensor(x, device="PYTHON"), Tensor(w, device="PYTHON"), GemmPlan(*plan)).numpy()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert got.shape == want.shape and got.dtype == np.float16, (got.shape, got.dtype)
    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
print(json.dumps(errors))
"""


def test_products_match_numpy_on_the_emulated_tensor_core():
    cases = [[list(lead), K, N, dataclasses.astuple(p)] for lead, K, N, p in CASES]
    env = {**os.environ, "DEV": "PYTHON::sm_80", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", EMULATED, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(errors) == len(CASES)
    for (lead, K, N, plan), err in zip(CASES, errors):
        assert err < 2e-3, f"{plan} on {lead}x{K}x{N}: max error {err:.1e} of the range"  # fp16 output rounding


@pytest.mark.parametrize("shape, plan", sorted(MEASURED_PLANS.items()))
def test_measured_plans_fit_their_shapes(shape, plan):
    assert plan.fits(*shape) and plan_for(*shape) == plan


@pytest.mark.parametrize("M, K, N", [(16, 2048, 2048), (64, 2048, 2048), (256, 2048, 2560), (2048, 2048, 32000),
                                     (48, 64, 64), (16, 64, 96)])
def test_heuristic_plans_fit_and_fill_the_gpu(M, K, N):
    plan = heuristic_plan(M, K, N)
    assert plan is not None and plan.fits(M, K, N)
    warps = (M // (16 * plan.m_tiles)) * (N // (8 * plan.n_tiles)) * plan.split
    assert warps >= 1024 or plan.split == 8 or M * N < 1024 * 16 * 8, f"{plan}: only {warps} warps"


@pytest.mark.parametrize("M, K, N", [(8, 2048, 2048), (24, 2048, 2048), (64, 2048, 100), (64, 40, 64)])
def test_no_plan_where_the_tiles_do_not_fit(M, K, N):
    """Rows not a multiple of 16, columns not of 8, K not of 32: the model keeps tinygrad's product."""
    assert plan_for(M, K, N) is None


def test_plan_names_parse_back_and_staged_candidates_fit():
    """`bench.gemm --plans-from` reads plans back from their names (str), staged and unrolled ones included."""
    from bench.gemm import parse_plan, staged_candidates

    for plan in [*MEASURED_PLANS.values(), GemmPlan(1, 2, 4, 8, 2, staged=True), GemmPlan(8, 1, 8, 1)]:
        assert parse_plan(str(plan)) == plan
    for M, K, N in [(64, 5632, 2048), (128, 2048, 11264)]:
        plans = staged_candidates(M, K, N)
        assert plans and all(p.staged and p.fits(M, K, N) for p in plans)
