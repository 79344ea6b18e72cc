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
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", type=int, default=0, help="also print the N most expensive functions")
    args = ap.parse_args()
    from bench.kernels import empty_model, prepare_null_device

    prepare_null_device()
    from tinygrad import Device

    from worker_svc import compat
    from worker_svc.runner import ModelRunner

    compat.apply_for(Device.DEFAULT)
    runner = ModelRunner(empty_model(args.shape, 256, 2048), [args.rows], [(1, 128)], max_steps=max(args.steps, 2))
    runner.capture(args.rows, 1)
    batch = runner.dummy_batch(args.rows, 1, num_steps=args.steps)
    for _ in range(5):
        runner.execute(batch)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        runner.execute(batch)
    ms = (time.perf_counter() - t0) / args.calls * 1e3
    print(f"{args.shape}, {args.rows} row(s), {args.steps}-step calls: {ms:.3f} ms of host time per call")
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
