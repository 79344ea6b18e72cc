"""`python -m bench.profile` (`make profile`): where a decode step's milliseconds go.

For each decode bucket, then each prefill bucket: the step time of the captured graph replayed as in serving, then
the same captured kernels run one by one with a device sync after each (tinygrad's DEBUG=2 timing), grouped by
kernel. One by one, each kernel also pays a launch and a sync that the graph hides, so the sum exceeds the graph's step on a GPU; the
per-kernel rows show which kernels dominate and how far each is from the device's bandwidth."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
from collections import defaultdict

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# tinygrad 0.14.0 DEBUG=2 line: "*** CUDA     12 r_32_16_4 ...  arg  3 mem   2.20 GB tm     10.24us/     1.23ms (...)"
KERNEL_LINE = re.compile(r"^\*\*\* \S+\s+\d+ (?P<name>.+?)\s+arg\s+\d+ mem .* tm\s+(?P<tm>[\d.]+)(?P<unit>us|ms|s)/"
                         r".*?(?P<gbs>[\d.]+)\|[\d.]*\s+GB/s")
UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}


def kernel_times(runner, batch) -> list[tuple[str, float, float]]:
    """(kernel name, microseconds, GB/s) for every kernel of one replay of the batch's graph, timed one by one;
    the batch's input copies are left out. The graph is restored afterwards."""
    from tinygrad.helpers import Context

    from worker_svc.runner import without_device_graphs

    captured = runner.captured()[runner.graph_key(batch)]
    original = captured._linear
    captured.__dict__.pop("linear", None)  # cached_property built from _linear
    captured._linear = without_device_graphs(original)  # kernels run and are timed one by one
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), Context(DEBUG=2):
            runner.execute(batch)
    finally:
        captured.__dict__.pop("linear", None)
        captured._linear = original
    rows = []
    for line in out.getvalue().splitlines():
        if (m := KERNEL_LINE.match(ANSI.sub("", line).strip())) and not m["name"].startswith("copy"):
            rows.append((m["name"].strip(), float(m["tm"]) * UNIT[m["unit"]], float(m["gbs"])))
    return rows


def summarize(rows: list[tuple[str, float, float]], top: int) -> list[dict]:
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for name, us, gbs in rows:
        entry = by_name[name]
        entry[0] += 1
        entry[1] += us
        entry[2] += gbs * us  # time-weighted bandwidth
    table = [dict(kernel=k, count=c, total_us=t, mean_us=t / c, gbs=w / t if t else 0.0)
             for k, (c, t, w) in by_name.items()]
    return sorted(table, key=lambda r: -r["total_us"])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="demo")
    ap.add_argument("--model", help="an existing checkpoint instead of a generated one")
    ap.add_argument("--decode-batch-sizes", default="1,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill-shapes", default="1x128", help="prefill buckets, profiled after the decode ones")
    ap.add_argument("--kv-cache-gb", type=float, default=8.0)
    ap.add_argument("--max-steps", type=int, default=16, help="decode steps per call when timing the graph (as bench)")
    ap.add_argument("--beam", type=int, default=0)
    ap.add_argument("--tuning", default=None, help="as the worker's --tuning ('none': tinygrad's heuristics alone)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from worker_svc.compat import configure_environment

    configure_environment(beam=args.beam)
    from tinygrad import Device

    from bench.__main__ import checkpoint_for
    from bench.worker_only import median_seconds, real_batch
    from worker_svc.buckets import parse_int_list, parse_shapes
    from worker_svc.engine import WorkerEngine, WorkerOptions

    engine = WorkerEngine(WorkerOptions(model=str(checkpoint_for(args)),
                                        decode_batch_sizes=parse_int_list(args.decode_batch_sizes),
                                        prefill_shapes=parse_shapes(args.prefill_shapes),
                                        max_steps=args.max_steps, kv_cache_gb=args.kv_cache_gb,
                                        tuning=args.tuning))
    runner = engine.runner
    report = dict(shape=args.shape, device=Device.DEFAULT, beam=args.beam, tuning=args.tuning or "shipped",
                  context=args.context, buckets=[],
                  jit_batch_size=os.environ.get("JIT_BATCH_SIZE", "default"))
    steps = args.max_steps
    shapes = [(rows, 1) for rows in runner.decode_batch_sizes] + [s for s in runner.prefill_shapes if s[1] > 1]
    for rows, tokens in shapes:
        decode = tokens == 1
        context = args.context if decode else tokens
        n = steps if decode else 1
        step_us = median_seconds(runner, real_batch(runner, rows, tokens, context, n), 10) / n * 1e6
        times = kernel_times(runner, real_batch(runner, rows, tokens, context))
        kernel_sum = sum(us for _, us, _ in times)
        report["buckets"].append(dict(rows=rows, tokens=tokens, graph_step_us=step_us, kernels=len(times),
                                      kernel_sum_us=kernel_sum, top=summarize(times, args.top)))
        what = f"decode rows={rows}, context {context}" if decode else f"prefill {rows}x{tokens}"
        print(f"\n== {what}, {Device.DEFAULT}, BEAM={args.beam}: graph {'step' if decode else 'call'} "
              f"{step_us:.0f} us; {len(times)} kernels sum to {kernel_sum:.0f} us one by one (each with its own "
              f"launch and sync)")
        print(f"{'us':>8} {'share':>6} {'n':>4} {'mean us':>8} {'GB/s':>6}  kernel")
        for r in report["buckets"][-1]["top"]:
            print(f"{r['total_us']:>8.0f} {r['total_us'] / kernel_sum:>6.1%} {r['count']:>4} {r['mean_us']:>8.1f} "
                  f"{r['gbs']:>6.0f}  {r['kernel']}")
    if args.out:
        path = pathlib.Path(args.out) / (f"profile-{args.shape}-{Device.DEFAULT.lower()}-beam{args.beam}"
                                         f"-jbs{report['jit_batch_size']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
