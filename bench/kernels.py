"""`python -m bench.kernels`: the kernels of each captured graph as another device would run them, on any machine.

tinygrad's NULL device runs nothing but lowers, optimises and renders every kernel with a chosen renderer
(`DEV=NULL:CUDA:sm_90`, `DEV=NULL:METAL`). With the compiler replaced by one that returns the rendered source,
this needs neither the GPU nor its toolchain, so CI can check on a CPU machine that the model renders for Metal
and CUDA and how many kernels a TinyLlama-sized decode step launches there (tests/test_kernels.py).

Run it in a fresh process: the device is chosen by DEV before tinygrad starts, and PARALLEL=0 keeps compilation
in this process (where the stub compilers are installed).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import types
from collections import Counter

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def install_render_only_compilers() -> None:
    """Compilers that return the source: Metal's needs macOS (ops_metal loads libSystem at import), CUDA's nvrtc."""
    from tinygrad.device import Compiler

    class RenderOnly(Compiler):
        def __init__(self, *args, **kwargs):
            super().__init__(None)

        def compile(self, src: str) -> bytes:
            return src.encode()

    sys.modules["tinygrad.runtime.ops_metal"] = types.SimpleNamespace(MetalCompiler=RenderOnly)
    from tinygrad.runtime.support import compiler_cuda

    compiler_cuda.NVRTCCompiler = compiler_cuda.NVCCCompiler = RenderOnly


def prepare_null_device() -> None:
    """What a benchmark on tinygrad's NULL device needs before it builds anything: DEV naming a NULL device with a
    renderer, copy-outs allowed (they return zeros), our process-wide tinygrad settings, and render-only
    compilers."""
    if not os.environ.get("DEV", "").startswith("NULL"):
        sys.exit("run with DEV=NULL:<renderer>, e.g. DEV=NULL:CUDA:sm_90 or DEV=NULL:METAL, and PARALLEL=0")
    os.environ.setdefault("NULL_ALLOW_COPYOUT", "1")
    from worker_svc.compat import configure_environment

    configure_environment()
    install_render_only_compilers()


def empty_model(shape: str, num_blocks: int, max_context: int):
    """A Llama of the shape with uninitialised weights: enough to capture and render graphs on the NULL device."""
    from tinygrad import Device, Tensor, dtypes

    from shared.demo_checkpoint import SHAPES
    from shared.llama_config import LlamaConfig
    from worker_svc.kv_cache import PagedKVCache
    from worker_svc.model import LlamaModel
    from worker_svc.weights import LayerWeights, LlamaWeights

    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or 400
    cfg = LlamaConfig.from_dict(dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                                     rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                                     torch_dtype="float16", tie_word_embeddings=False, **dims))
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_dim = cfg.num_attention_heads * hd

    def empty(*shape: int) -> Tensor:
        return Tensor.empty(*shape, dtype=dtypes.half).realize()

    layers = [LayerWeights(empty(D), empty(q_dim + 2 * cfg.kv_dim, D), empty(D, q_dim), empty(D), empty(2 * I, D),
                           empty(D, I)) for _ in range(cfg.num_hidden_layers)]
    weights = LlamaWeights(empty(cfg.vocab_size, D), layers, empty(D), empty(cfg.vocab_size, D))
    cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, 16, cfg.num_key_value_heads, hd, dtypes.half,
                         Device.DEFAULT)
    return LlamaModel(cfg, weights, cache, max_context)


def census(shape: str, decode_batch_sizes: list[int], prefill_shapes: list[tuple[int, int]],
           num_blocks: int = 1024, max_context: int = 2048, skip_prefill: bool = False) -> dict[str, dict]:
    """Per captured graph (plain, and the full-sampling variant): kernel count, names, and how many use
    tensor-core instructions.
    skip_prefill: capture the decode buckets only (the runner still needs a prefill shape to exist)."""
    from tinygrad.uop.ops import Ops

    from worker_svc.runner import ModelRunner, without_device_graphs

    runner = ModelRunner(empty_model(shape, num_blocks, max_context), decode_batch_sizes, prefill_shapes, max_steps=2)
    out = {}
    for B, T in runner.buckets:
        if skip_prefill and T > 1:
            continue
        runner.capture(B, T)
        for full in (False, True):
            calls = without_device_graphs(runner.captured()[(B, T, full)]._linear).src
            programs = [c.src[0] for c in calls if c.src[0].op is Ops.PROGRAM]
            names = Counter(ANSI.sub("", p.arg.name) for p in programs)
            tensor_core = sum(1 for p in programs if "mma" in str(p.src[-1].arg) or "simdgroup_multiply" in str(p))
            # the full graph: top-k/top-p, penalties, bias, min_p and logprobs (runs when a row asks for any)
            out[f"{B}x{T}" + (" full sampling" if full else "")] = dict(
                kernels=len(programs), tensor_core_kernels=tensor_core, names=dict(names))
    return out


def run_in_subprocess(dev: str, *args: str) -> str:
    """`python -m bench.kernels ARGS` with DEV=dev (tinygrad reads DEV once, at import): its output."""
    import subprocess

    from shared.processes import ROOT

    env = {**os.environ, "DEV": dev, "PARALLEL": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.kernels", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench.kernels {' '.join(args)} on {dev} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="tinyllama")
    ap.add_argument("--decode-batch-sizes", default="1,64")
    ap.add_argument("--prefill-shapes", default="16x128")
    ap.add_argument("--decode-only", action="store_true", help="capture the decode buckets only")
    ap.add_argument("-v", "--verbose", action="store_true", help="list the kernels of each graph")
    args = ap.parse_args()
    prepare_null_device()
    from worker_svc.buckets import parse_int_list, parse_shapes

    for bucket, info in census(args.shape, parse_int_list(args.decode_batch_sizes),
                               parse_shapes(args.prefill_shapes), skip_prefill=args.decode_only).items():
        print(f"{bucket}: {info['kernels']} kernels, {info['tensor_core_kernels']} with tensor-core instructions")
        if args.verbose:
            for name, n in info["names"].items():
                print(f"    {n:4d}  {name}")


if __name__ == "__main__":
    main()
