"""`python -m bench.tune` (`make tune`): BEAM-search a model's large kernels once and write a tuning table.

The worker loads `tuning/<DEV>.json` at start and applies what is in it without searching (worker_svc.tuning), so
the table written here is what lets a fresh machine reach full speed in the time it takes to compile. Only kernels
that move at least --min-mb of memory are searched (the projections, the LM head, attention over a long context);
the many small ones keep tinygrad's heuristics, which is where most of a full search's minutes went. Entries
already in the table are kept and not searched again, so a table can be built over several runs.
"""
from __future__ import annotations

import argparse
import pathlib
import time


def main() -> None:
    from worker_svc.buckets import DEFAULT_DECODE_BATCH_SIZES, DEFAULT_PREFILL_SHAPES, format_int_list, format_shapes
    from worker_svc.tuning import LARGE_BYTES

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="tinyllama")
    ap.add_argument("--model", help="an existing checkpoint instead of a generated one")
    ap.add_argument("--decode-batch-sizes", default=format_int_list(DEFAULT_DECODE_BATCH_SIZES))
    ap.add_argument("--prefill-shapes", default=format_shapes(DEFAULT_PREFILL_SHAPES))
    ap.add_argument("--beam", type=int, default=2, help="BEAM width: 2 searched a TinyLlama bucket in about 4 min on an H200")
    ap.add_argument("--min-mb", type=float, default=LARGE_BYTES / 1e6,
                    help="search only kernels touching at least this much")
    ap.add_argument("--out", default="", help="default: tuning/<DEV>.json (entries already there are kept)")
    ap.add_argument("--worker-args", default="", help="as the worker will be started, e.g. '--kv-cache-gb 8'")
    args = ap.parse_args()
    from worker_svc.compat import configure_environment

    configure_environment(beam=args.beam)
    from tinygrad import Device

    from bench.__main__ import checkpoint_for
    from worker_svc import tuning
    from worker_svc.buckets import parse_int_list, parse_shapes
    from worker_svc.engine import WorkerEngine, WorkerOptions

    out = args.out or str(tuning.default_path(Device.DEFAULT))
    table = tuning.TuningTable.load(out) if pathlib.Path(out).exists() else tuning.TuningTable()
    table.device = Device.DEFAULT.split(":")[0]
    tuning.install(table, record_min_bytes=int(args.min_mb * 1e6))
    extra = _parse_worker_args(args.worker_args)
    # no capture cache: a kernel lowered from it would skip the search that records its entry
    engine = WorkerEngine(WorkerOptions(model=str(checkpoint_for(args)), tuning="none", warm_up=False,
                                        capture_cache=False,
                                        decode_batch_sizes=parse_int_list(args.decode_batch_sizes),
                                        prefill_shapes=parse_shapes(args.prefill_shapes), **extra))
    meta = dict(shape=args.shape, model=engine.path.name, beam=args.beam, min_mb=args.min_mb)
    for B, T in engine.runner.buckets:  # saved after each bucket: a run cut short keeps what it found
        t0, known = time.perf_counter(), len(table.entries)
        engine.runner.capture(B, T)
        table.save(out, meta)
        print(f"bucket {B}x{T}: {len(table.entries) - known} kernels searched in {time.perf_counter() - t0:.0f}s; "
              f"{len(table.entries)} in {out}", flush=True)


def _parse_worker_args(text: str) -> dict:
    """The worker flags that change kernel shapes, as WorkerOptions fields."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-cache-gb", type=float)
    ap.add_argument("--kv-blocks", type=int)
    ap.add_argument("--max-context", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--block-size", type=int)
    return {k: v for k, v in vars(ap.parse_args(text.split())).items() if v is not None}


if __name__ == "__main__":
    main()
