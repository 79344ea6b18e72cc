"""`python -m bench.host_call`: the worker's own host (Python) time per call, on any machine.

On tinygrad's NULL device (`DEV=NULL:CUDA:sm_90 PARALLEL=0`) kernels are lowered and rendered but nothing runs, so
timing `ModelRunner.execute` there measures the launch path's CPU work alone: uploading the call's inputs,
replaying its graphs, starting the read-back. On a GPU that work overlaps the device only while it is shorter than
the call's device time; a 2-step batch-1 call of the TinyLlama shape is 2.2 ms of an H200, which is why this
figure decides a single stream's pace there. `--profile N` prints the N most expensive functions (cProfile).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="demo")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="decode steps per call (the scheduler's default: 2)")
    ap.add_argument("--tokens", type=int, default=1, help="prompt tokens per row: above 1, a prefill call of the "
                    "ROWSxTOKENS bucket (the path of a request's first token)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", type=int, default=0, help="also print the N most expensive functions")
    args = ap.parse_args()
    from bench.kernels import empty_model, prepare_null_device

    prepare_null_device()
    from tinygrad import Device

    from worker_svc import compat
    from worker_svc.runner import ModelRunner

    compat.apply_for(Device.DEFAULT)
    prefill = (args.rows, args.tokens) if args.tokens > 1 else (1, 128)
    runner = ModelRunner(empty_model(args.shape, 256, 2048), [args.rows], [prefill], max_steps=max(args.steps, 2))
    runner.capture(args.rows, args.tokens)
    steps = 1 if args.tokens > 1 else args.steps
    batch = runner.dummy_batch(args.rows, args.tokens, num_steps=steps)
    for _ in range(5):
        runner.execute(batch)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        runner.execute(batch)
    ms = (time.perf_counter() - t0) / args.calls * 1e3
    call = f"{args.rows}x{args.tokens} prefill calls" if args.tokens > 1 else f"{args.rows} row(s), {steps}-step calls"
    print(f"{args.shape}, {call}: {ms:.3f} ms of host time per call")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            runner.execute(batch)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
