"""Structural invariants of the captured graphs as a GPU would run them, checked on this CPU machine: tinygrad's
NULL device lowers and renders every kernel with the Metal or CUDA renderer without running it (bench/kernels.py)."""
from __future__ import annotations

import re

from bench.kernels import run_in_subprocess

# a batch-1 decode step at the TinyLlama shape: issue #7's first bar was 200 and its goal is 120 (320 kernels before
# the fused attention, 144 before the one-row kernels wrote K and V themselves and returned fp32 logits and
# attention read the block tables in place)
MAX_KERNELS_TINYLLAMA_DECODE = 120


def counts(output: str) -> dict[str, tuple[int, int]]:
    """bucket -> (kernels, kernels with tensor-core instructions)"""
    return {m[1]: (int(m[2]), int(m[3]))
            for m in re.finditer(r"^(\d+x\d+): (\d+) kernels, (\d+) with tensor-core", output, re.M)}


def test_the_model_renders_for_metal():
    """Decode (with the fused paged-attention kernel) and prefill graphs lower and render for Apple GPUs."""
    found = counts(run_in_subprocess("NULL:METAL", "--shape", "demo", "--decode-batch-sizes", "1,4",
                                     "--prefill-shapes", "4x16"))
    assert set(found) == {"1x1", "4x1", "4x16"}
    # 2 layers: one attention kernel each, no gathers. One row has one kernel fewer: its block table is read in
    # place, where with more rows tinygrad copies the step's metadata once (as it copied the tables before)
    assert found["1x1"][0] + 1 == found["4x1"][0] <= 32


def test_tinyllama_decode_step_kernel_count_on_cuda():
    """Kernel launches per batch-1 decode step at the TinyLlama shape (22 layers), rendered for an H100/H200."""
    found = counts(run_in_subprocess("NULL:CUDA:sm_90", "--shape", "tinyllama", "--decode-batch-sizes", "1",
                                     "--prefill-shapes", "1x16", "--decode-only"))
    kernels, _ = found["1x1"]
    assert kernels <= MAX_KERNELS_TINYLLAMA_DECODE, f"{kernels} kernels per batch-1 decode step"


def kernel_names(output: str, bucket: str) -> dict[str, int]:
    """kernel name -> launches in one bucket's listing of `bench.kernels -v`"""
    section = re.split(rf"^{bucket}: .*$", output, maxsplit=1, flags=re.M)[1].lstrip("\n")
    names: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"^\s+(\d+)\s+(\S+)$", line)
        if not m:
            break
        names[m[2]] = names.get(m[2], 0) + int(m[1])
    return names


def test_batches_run_the_custom_tensor_core_product_on_cuda():
    """From 16 rows on, every projection and the LM head are worker_svc.tc_gemm's kernel when rendered for CUDA, and
    each residual add but the last is one kernel with the norm after it (worker_svc.residual_norm)."""
    out = run_in_subprocess("NULL:CUDA:sm_90", "--shape", "demo", "--decode-batch-sizes", "16", "--prefill-shapes",
                            "1x16", "--decode-only", "-v")
    kernels, with_tensor_cores = counts(out)["16x1"]
    assert with_tensor_cores == 2 * 4 + 1  # four projections in each of 2 layers, and the LM head
    # 9 a layer: the 4 products, the K/V write, attention, 2 residual norms, the SwiGLU. Each of them adds up the
    # split-K partials it reads (no sum kernels), and the attention output is read as it is (no copy); 16 outside
    # the layers
    assert kernels <= 2 * 9 + 16
    names = kernel_names(out, "16x1")
    assert sum(n for k, n in names.items() if k.startswith("residual_norm_")) == 2 * 2 - 1
    # the only other norms: the first layer's, before any residual add, and the final one before the LM head
    assert sum(n for k, n in names.items() if k.startswith("sum_squares_")) == 2


def test_batch1_step_renders_for_metal_with_the_one_row_kernels():
    """worker_svc.gemv's kernels (8-byte loads there: Metal has no 8-wide half vector) at the TinyLlama shape."""
    out = run_in_subprocess("NULL:METAL", "--shape", "tinyllama", "--decode-batch-sizes", "1", "--prefill-shapes",
                            "1x16", "--decode-only", "-v")
    assert counts(out)["1x1"][0] <= MAX_KERNELS_TINYLLAMA_DECODE
    for name in ("gemv_2560_2048_norm", "gemv_2048_2048_res", "gemv_11264_2048_norm", "gemv_2048_5632_swiglu_res",
                 "gemv_32000_2048_norm"):
        assert name in out, f"{name} missing from the batch-1 step"
