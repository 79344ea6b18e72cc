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


def simplify_symbolic_estimates() -> None:
    """tinygrad 0.14.0 sums a kernel's FLOP estimate op by op (renderer Estimates.from_uops) and keeps the sum
    unsimplified. With a symbolic size (our attention's block count) a large kernel's estimate becomes a chain of
    ~1,200 nested adds; tinygrad hashes kernels by repr(), and repr() of that chain exceeds Python 3.12's C
    recursion limit (RecursionError at warm-up, seen on CUDA sm_90 for batch 256 and multi-row prefill).
    Simplified, the same estimate is `num_blocks * constant`."""
    if "estimates" in _applied:
        return
    from tinygrad.renderer import Estimates

    original = Estimates.from_uops

    def from_uops(uops, ignore_indexing=False):
        return original(uops, ignore_indexing).simplify()

    Estimates.from_uops = staticmethod(from_uops)
    _applied.add("estimates")


def init_compile_worker() -> None:
    """Initializer of tinygrad's compile/BEAM worker processes: tinygrad's own, after our fixes. The workers are
    spawned, so they start without the patches of the parent; they compile kernels (and search BEAM candidates)
    whose estimates they pickle back, which is where an unsimplified estimate overflowed the recursion limit.
    They also optimise kernels, so they load the parent's tuning table (worker_svc.tuning)."""
    from worker_svc import tuning

    simplify_symbolic_estimates()
    tuning.install_from_environment()
    _original_init_worker()


def _original_init_worker() -> None:
    from tinygrad.engine import worker

    getattr(worker, "_tinygrad_init_worker", worker._init_worker)()


def patch_compile_workers() -> None:
    """Make tinygrad's compile pool (PARALLEL > 0, also used by BEAM search) start its processes with
    `init_compile_worker`. The pool looks `_init_worker` up by name when it is created, and pickles it by
    reference, so the spawned processes import this module and apply the fixes before their first kernel."""
    if "compile_workers" in _applied:
        return
    from tinygrad.engine import worker

    worker._tinygrad_init_worker = worker._init_worker
    worker._init_worker = init_compile_worker
    worker.terminate_worker_pool()  # a pool started before this patch would keep the unpatched processes
    _applied.add("compile_workers")


def capture_on_next_call(jit) -> None:
    """Make a TinyJit capture on its next call instead of running it eagerly first.

    tinygrad 0.14.0's TinyJit runs call 1 eagerly, captures on call 2 and replays from call 3 (engine/jit.py). The
    eager call builds the step's tensor graph, schedules it into kernels, lowers and runs them, and the capture call
    then builds and schedules it all again (lowered kernels come from the in-memory cache): a third of a bucket's
    warm-up (bench.startup). The eager call exists to realize what a function creates lazily on first use, so that
    it is not captured into every replay; everything our steps read (weights, KV pool, rope tables, sampled and
    count buffers, inputs) is realized before capture, so capturing at once gives the same graph."""
    if jit.cnt == 0:
        jit.cnt = 1


def replay(jit, *args):
    """jit(*args) for a TinyJit that has captured and replayed once, without tinygrad 0.14.0's per-call input
    preparation (engine/jit.py `_prepare_jit_inputs`: a graph rewrite of every input tensor to find its buffer and
    unbind its variables, and checks that the inputs match the capture's). That was half of a worker call's host
    time (`bench.host_call` on the NULL device: 2-step batch-1 calls), and a batch-1 step on an H200 is short enough
    (1.1 ms) for a call's host time to decide a stream's pace. The runner passes the same buffers to a graph on
    every call (its inputs are the upload graph's outputs, or its own host arrays), so after tinygrad's own checks
    passed on the first replay, each replay hands the captured graph its buffers and variable values directly. Any
    argument that is not a realized buffer takes tinygrad's path."""
    from tinygrad import Tensor

    captured = jit.captured
    if captured is None or jit.cnt < 3:
        return jit(*args)
    bufs, var_vals = [], {}
    for a in args:
        if isinstance(a, Tensor):
            base = a.uop.base
            if base.realized is None:
                return jit(*args)
            bufs.append(base)
        else:  # a bound variable
            var, val = a.unbind()
            var_vals[var.expr] = val
    if len(bufs) != len(captured.expected_input_info):
        return jit(*args)
    ret = captured(bufs, var_vals)
    jit.cnt += 1
    return ret


def per_thread_cache_database() -> None:
    """tinygrad 0.14.0 keeps one sqlite connection to its cache database (helpers.db_connection), opened by the first
    thread that looks a compiled kernel up, and sqlite refuses it in every other thread ("SQLite objects created in
    a thread can only be used in that same thread"). Warm-up compiles in the main thread, so a kernel compiled
    later in a gRPC thread (a graph captured on its first use: prompt logprobs) failed. Each thread gets a
    connection of its own, opened as tinygrad opens its one."""
    if "cache_db" in _applied:
        return
    import contextlib
    import os
    import sqlite3
    import threading

    from tinygrad import helpers

    local = threading.local()

    def db_connection() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            os.makedirs(os.path.dirname(helpers.CACHEDB), exist_ok=True)
            conn = local.conn = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE")
            with contextlib.suppress(sqlite3.OperationalError):
                conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    helpers.db_connection = db_connection
    _applied.add("cache_db")


def apply_for(device: str) -> None:
    from worker_svc import lowering

    simplify_symbolic_estimates()
    per_thread_cache_database()  # graphs captured on first use compile kernels in serving threads
    lowering.install()  # programs swapped into the calls without rewriting whole graphs
    patch_compile_workers()
    if device.split(":")[0] == "CUDA":
        fix_cuda_graph_symbolic_launch_dims()


def configure_environment(beam: int = 0) -> None:
    """Process-wide tinygrad settings; call before tinygrad is imported, which reads them once.

    beam > 0: BEAM kernel search of that width for the captured kernels (JITBEAM), cached on disk by tinygrad.
    Kernels compile (and BEAM candidates are searched) in tinygrad's pool of processes (PARALLEL, one per core by
    default); `patch_compile_workers` gives those processes our fixes."""
    import os

    # one device graph per captured step instead of tinygrad's default batches of 32, 64, 128, ... kernels (four
    # graph launches for a TinyLlama step of 320 kernels). Small: the bench's batch-1 step on the H200 went from
    # 1.786 to 1.768 ms.
    os.environ.setdefault("JIT_BATCH_SIZE", "0")
    # 16-byte loads of fp16 data on CUDA (tinygrad stops at 8 bytes by default; Metal has no 8-wide half vector):
    # the tensor-core products (worker_svc.tc_gemm) load each lane's operands 8 halves at a time. On the H200
    # their best plans ran about 40% faster this way at the median (bench/results/h200-gemm-plans-*2026-11-28.log)
    if os.environ.get("DEV", "").split(":")[0] in ("CUDA", "NV"):
        os.environ.setdefault("ALLOW_HALF8", "1")
    if beam:
        os.environ["JITBEAM"] = str(beam)
        # stop searching a kernel once a round improves it by less than 1 us (tinygrad's default: 0.01 us). Most
        # of a graph's kernels take a few us; this cut a cold-cache search of one TinyLlama decode bucket on the
        # H200 to about 4 minutes, and the large matrix kernels still improve 5-10x.
        os.environ.setdefault("BEAM_MIN_PROGRESS", "1")
