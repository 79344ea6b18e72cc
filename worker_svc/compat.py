"""Compatibility fixes for tinygrad 0.14.0, each naming what it works around. Applied once at worker start."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_applied: set[str] = set()


def clamp_launch_dims(dims: tuple[tuple[int, ...], tuple[int, ...] | None]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """A launch grid with no zero-sized dimension (zero launches nothing, and CUDA graphs refuse it)."""
    global_size, local_size = dims
    return tuple(max(1, int(d)) for d in global_size), None if local_size is None else tuple(max(1, int(d)) for d in local_size)


def fix_cuda_graph_symbolic_launch_dims() -> None:
    """tinygrad 0.14.0 builds each CUDA graph node with every symbolic variable set to 0
    (runtime/graph/cuda.py: `launch_dims({v: 0 for v in self.vars})`). A kernel whose grid depends on a variable
    (our attention, on the number of blocks read) then gets a zero-sized grid and cuGraphAddKernelNode fails with
    CUDA_ERROR_INVALID_VALUE (upstream issue #9065). The dims are overwritten with the real values on every replay
    (`updated_launch_dims`), so building the nodes with dims clamped to >= 1 is enough."""
    if "cuda_graph" in _applied:
        return
    from tinygrad.runtime.graph import cuda as cuda_graph
    from tinygrad.uop.ops import ProgramInfo

    original_init, original_dims = cuda_graph.CUDAGraph.__init__, ProgramInfo.launch_dims

    def launch_dims_at_least_one(self, var_vals):
        return clamp_launch_dims(original_dims(self, var_vals))

    def init(self, *args, **kwargs):
        ProgramInfo.launch_dims = launch_dims_at_least_one
        try:
            original_init(self, *args, **kwargs)
        finally:
            ProgramInfo.launch_dims = original_dims

    cuda_graph.CUDAGraph.__init__ = init
    _applied.add("cuda_graph")
    log.info("applied the CUDA graph launch-dims fix for tinygrad 0.14.0")


def allow_deep_graphs() -> None:
    """tinygrad rewrites UOp graphs recursively and sets a recursion limit of 10,000 when it is imported; a
    22-layer prefill graph (TinyLlama, 128 tokens) went past it on CUDA. The limit only bounds Python frames."""
    import sys

    import tinygrad.schedule.rangeify  # noqa: F401  (it lowers the limit to 10,000 when first imported)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 200_000))


def apply_for(device: str) -> None:
    allow_deep_graphs()
    if device.split(":")[0] == "CUDA":
        fix_cuda_graph_symbolic_launch_dims()


def configure_environment() -> None:
    """Process-wide tinygrad settings; call before tinygrad is imported.

    PARALLEL=0: tinygrad 0.14.0 compiles kernels in a pool of spawned processes and pickles the results back;
    on CUDA a captured TinyLlama bucket produced a program whose pickling exceeded Python's recursion limit, the
    pool worker died and warm-up hung. Compiling in-process avoids that and costs little: the layers share kernels."""
    import os

    os.environ.setdefault("PARALLEL", "0")
