"""`python -m bench.startup`: the worker's warm-up (graph capture) timed as the real worker runs it, on any machine.

On a GPU a worker restart (compiled kernels in tinygrad's cache) is almost all tinygrad's Python work: scheduling
tensors into kernels, optimising and lowering each kernel, rendering its source. tinygrad's NULL device does all of
that with a chosen renderer and runs nothing (bench/kernels.py), so this measures the restart's Python work on a CPU
machine: `DEV=NULL:CUDA:sm_90 PARALLEL=0 python -m bench.startup` captures the default buckets at the TinyLlama
shape with the shipped tuning table (tuning/CUDA.json) applied, and prints seconds per bucket and per graph call,
and where they went (scheduling, jit lowering, kernel lowering, rendering). `--profile FILE` also writes a cProfile.
The compiler is a stub (returns the source), so nvrtc's time on a fresh machine is not in these figures.

The worker's capture cache (worker_svc.capture_cache) is on, as in the worker, in tinygrad's cache database
(CACHEDB); `--restart` runs the benchmark twice in fresh processes over a new, empty database: a first start, then
a restart that takes schedules and lowered kernels from it. All lowering runs in this process (PARALLEL=0), where
a GPU worker spreads it over a pool of processes, one per core.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

SPLIT = ("schedule", "jit_lower", "lower", "linearize", "render", "compile")


class Clock:
    """Seconds spent in each phase, innermost phase only (a phase nested in another is not counted twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((name, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[name] += end - since
            self.calls[name] += 1
            if self._stack:
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, end)

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def instrument(clock: Clock) -> None:
    """Time tinygrad's phases where it looks them up by name at call time (module globals, class attributes)."""
    from tinygrad import Device, Tensor, codegen
    from tinygrad.engine import jit

    Tensor.linear_with_vars = clock.wrap("schedule", Tensor.linear_with_vars)
    jit.jit_lower = clock.wrap("jit_lower", jit.jit_lower)
    # do_to_program less what is nested in it: linearising (and estimates); full_rewrite_to_sink: optimising and
    # lowering the kernel AST; the renderer's render: writing its source
    codegen.do_to_program = clock.wrap("linearize", codegen.do_to_program)
    codegen.full_rewrite_to_sink = clock.wrap("lower", codegen.full_rewrite_to_sink)
    renderer = Device[Device.DEFAULT].renderer
    type(renderer).render = clock.wrap("render", type(renderer).render)
    if (compiler := getattr(renderer, "compiler", None)) is not None:
        type(compiler).compile_cached = clock.wrap("compile", type(compiler).compile_cached)


def run(shape: str, decode_batch_sizes: list[int], prefill_shapes: list[tuple[int, int]], max_steps: int,
        tuning_path: str | None, num_blocks: int, max_context: int, cache: bool = True) -> dict:
    """Captures every bucket as ModelRunner.warm_up does; per bucket and per graph call: seconds and their split."""
    from tinygrad.engine.jit import _TinyJit

    from bench.kernels import empty_model
    from worker_svc import capture_cache, tuning
    from worker_svc.runner import ModelRunner

    table = None
    if tuning_path and tuning_path.lower() != "none":
        table = tuning.TuningTable.load(tuning_path)
        tuning.install(table, key_device=table.device or None)
    clock = Clock()
    instrument(clock)
    t0 = time.perf_counter()
    runner = ModelRunner(empty_model(shape, num_blocks, max_context), decode_batch_sizes, prefill_shapes, max_steps)
    setup_s = time.perf_counter() - t0
    names = {id(j): f"{b}x{t}{' full' if f else ''}" for (b, t, f), j in runner._jits.items()}
    names.update({id(j): f"{b}x{t} upload" for (b, t), j in runner._uploads.items()})
    calls: list[dict] = []
    original_call = _TinyJit.__call__

    def timed_call(self, *args, **kwargs):
        before, cnt, t = clock.snapshot(), self.cnt, time.perf_counter()
        try:
            return original_call(self, *args, **kwargs)
        finally:
            after = clock.snapshot()
            calls.append(dict(graph=names.get(id(self), "?"), call=cnt, s=time.perf_counter() - t,
                              split={k: after.get(k, 0.0) - before.get(k, 0.0) for k in SPLIT}))

    _TinyJit.__call__ = timed_call
    buckets = []
    original_capture = ModelRunner.capture

    def timed_capture(self, B: int, T: int) -> None:
        before, t = clock.snapshot(), time.perf_counter()
        original_capture(self, B, T)
        after = clock.snapshot()
        buckets.append(dict(bucket=f"{B}x{T}", s=time.perf_counter() - t,
                            split={k: after.get(k, 0.0) - before.get(k, 0.0) for k in SPLIT}))

    ModelRunner.capture = timed_capture
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        with capture_cache.active() if cache else contextlib.nullcontext():
            runner.warm_up(progress=False)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        _TinyJit.__call__, ModelRunner.capture = original_call, original_capture
    return dict(cache=vars(capture_cache.stats) if cache else None, setup_s=setup_s, warm_up_s=total, warm_up_cpu_s=cpu, buckets=buckets, calls=calls, split=clock.snapshot(),
                tuning_hits=table.hits if table else None, tuning_misses=table.misses if table else None,
                tuning_large_misses=sorted(set(table.large_misses)) if table else None)


def print_report(report: dict, verbose: bool) -> None:
    def fmt(split: dict) -> str:
        return "  ".join(f"{k} {v:6.2f}" for k, v in split.items() if v >= 0.005)

    for b in report["buckets"]:
        print(f"bucket {b['bucket']:>7}: {b['s']:7.2f} s   {fmt(b['split'])}")
    if verbose:
        for c in report["calls"]:
            print(f"    {c['graph']:>14} call {c['call']}: {c['s']:6.2f} s   {fmt(c['split'])}")
    by_call: dict[int, float] = defaultdict(float)
    for c in report["calls"]:
        by_call[c["call"]] += c["s"]
    print("by TinyJit call (0: eager, 1: capture, 2+: replay): "
          + ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(by_call.items())))
    print(f"total warm-up {report['warm_up_s']:.2f} s, {report['warm_up_cpu_s']:.2f} s of CPU in this process "
          f"(runner set-up {report['setup_s']:.2f} s); "
          f"split: {fmt(report['split'])}; tuning table hits {report['tuning_hits']}, misses {report['tuning_misses']}")
    if report["tuning_large_misses"]:
        from worker_svc.tuning import LARGE_BYTES

        print(f"large kernels ({LARGE_BYTES / 1e6:g} MB or more) the tuning table lacks, so they run on tinygrad's heuristics "
              f"(`make tune` searches them): {', '.join(report['tuning_large_misses'])}")
    if report["cache"] is not None:
        print("capture cache: " + ", ".join(f"{k} {v}" for k, v in report["cache"].items()))


def restart(argv: list[str]) -> None:
    """This benchmark twice in fresh processes sharing a new, empty cache database: a first start, then a restart."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tinyvllm-startup-") as tmp:
        env = {**os.environ, "CACHEDB": os.path.join(tmp, "cache.db"), "PARALLEL": "0"}
        for label in ("first start (empty cache database)", "restart"):
            print(f"--- {label}", flush=True)
            subprocess.run([sys.executable, "-m", "bench.startup", *argv], env=env, check=True)


def main() -> None:
    from worker_svc.buckets import (DEFAULT_DECODE_BATCH_SIZES, DEFAULT_PREFILL_SHAPES, format_int_list,
                                    format_shapes, parse_int_list, parse_shapes)
    from worker_svc.tuning import TUNING_DIR

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="tinyllama")
    ap.add_argument("--decode-batch-sizes", default=format_int_list(DEFAULT_DECODE_BATCH_SIZES))
    ap.add_argument("--prefill-shapes", default=format_shapes(DEFAULT_PREFILL_SHAPES))
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--tuning", default=str(TUNING_DIR / "CUDA.json"), help="'none': tinygrad's heuristics alone")
    # the KV pool the worker's default --kv-cache-gb 4 gives at the TinyLlama shape (the pool's size is part of the
    # attention kernels' ASTs, so it decides which entries of the tuning table apply)
    ap.add_argument("--num-blocks", type=int, default=22195)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--profile", default=None, help="write a cProfile of the warm-up to this file")
    ap.add_argument("--json", default=None, help="write the report as JSON to this file")
    ap.add_argument("--no-cache", action="store_true", help="without the worker's capture cache on disk")
    ap.add_argument("--restart", action="store_true",
                    help="run twice in fresh processes with a new cache database: a first start, then a restart")
    ap.add_argument("-v", "--verbose", action="store_true", help="every graph call")
    args = ap.parse_args()
    if args.restart:
        return restart([a for a in sys.argv[1:] if a != "--restart"])
    from bench.kernels import prepare_null_device

    prepare_null_device()
    call = functools.partial(run, args.shape, parse_int_list(args.decode_batch_sizes),
                             parse_shapes(args.prefill_shapes), args.max_steps, args.tuning, args.num_blocks,
                             args.max_context, not args.no_cache)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        report = profiler.runcall(call)
        profiler.dump_stats(args.profile)
    else:
        report = call()
    print_report(report, args.verbose)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
