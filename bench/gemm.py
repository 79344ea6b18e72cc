"""`python -m bench.gemm`: which formulation of a projection (x @ W.T, fp16 in, fp32 accumulate) is fastest here.

The decode and prefill steps are dominated by four weight products per layer. tinygrad's tensor-core kernels keep
the whole reduction (K) in one thread's loop and do not split it across threads ("no grouping with tensor
cores"), so with few rows a product runs on a handful of workgroups that each wait on global loads. This script
times, per (rows, K, N): tinygrad's default kernel, the same without tensor cores, and split-K forms (S partial
products over K/S each, then a sum over S) that give the GPU S times more workgroups; optionally a BEAM search.
Each measurement replays one captured graph of `--mats` dependent products on distinct weights and reports
microseconds per product and GB/s of weights read.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace

SHAPES = {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 11264), "down": (5632, 2048)}  # (K, N)


def product(x, w, split):
    """The worker's projection (worker_svc.model.project: split > 1 sums that many partial products over K), or
    with split 0 the transposed product (w @ x.T).T: the weight rows on the tensor core's M side; or, for a
    GemmPlan, the custom tensor-core kernel (worker_svc.tc_gemm)."""
    from worker_svc.model import project, split_k_for_tensor_cores
    from worker_svc.tc_gemm import GemmPlan, tc_project

    if isinstance(split, GemmPlan):
        return tc_project(x, w, split)
    if split == -1:  # the worker's choice
        split = split_k_for_tensor_cores(x.shape[0], x.shape[1], w.shape[0])
    return (w @ x.T).T if split == 0 else project(x, w, split)


def plan_candidates(M: int, K: int, N: int, warps: int = 4) -> list:
    """Custom-kernel plans to sweep for one shape with `warps` warps a workgroup: every tile shape of up to 128
    accumulators a lane and every split of K that fit it."""
    from worker_svc.tc_gemm import GemmPlan

    out = []
    for m in ((1, 2, 4) if M <= 64 else (2, 4, 8)):
        for n in ((1, 2, 4, 8) if M <= 16 else (2, 4, 8)):
            for s in (1, 2, 4, 8):
                plan = GemmPlan(m, n, warps, s)
                # split only while the fp32 partials stay under 16 MB (beyond, the sum kernel costs more)
                if 2 <= m * n <= 32 and (s == 1 or M * N * s <= 1 << 22) and plan.fits(M, K, N):
                    out.append(plan)
    return out


def sweep_plans(M: int, K: int, N: int, mats: int, reps: int, plans: list | None = None, rounds: int = 1) -> dict:
    """Every candidate plan at 4 warps a workgroup, then the best two with 1, 2 and 8 warps: {plan: us}. With
    `plans`, just those; with `rounds` > 1, each timed that many times, round-robin, keeping its best."""
    from tinygrad import Tensor, dtypes

    given = plans is not None
    plans = plans if given else plan_candidates(M, K, N)
    # compile every candidate in one realize: tinygrad lowers the kernels of one schedule in its process pool
    x, w = Tensor.empty(M, K, dtype=dtypes.half), Tensor.empty(N, K, dtype=dtypes.half)
    Tensor.realize(*[product(x, w, plan) for plan in plans])
    # the GPU idled while they compiled: one untimed run first, or the first plan timed pays the clocks' ramp-up
    time_variant(M, K, N, plans[0], mats, reps * 4, {})
    times = {}
    for _ in range(rounds):
        for plan in plans:
            us = time_variant(M, K, N, plan, mats, reps, {})
            times[plan] = min(us, times.get(plan, us))
    for plan in ([] if given else sorted(times, key=times.get)[:2]):
        for warps in (1, 2, 8):
            other = replace(plan, warps=warps)
            if other.fits(M, K, N) and other not in times:
                times[other] = time_variant(M, K, N, other, mats, reps, {})
    return times


def staged_candidates(M: int, K: int, N: int) -> list:
    """Plans that stage the activations in shared memory (GemmPlan.staged): a workgroup's 16 * m_tiles rows, all
    of them or half (at most 128), shared by 4 or 8 warps; tiles of 1-4 columns of 8 a warp; every split of K
    whose partials stay under 16 MB, with at least one workgroup per SM of an H100/H200 (132) and at most 4096."""
    from worker_svc.tc_gemm import GemmPlan

    top = min(8, M // 16)
    out = []
    for m in sorted({top, max(1, top // 2)}):
        for n in (1, 2, 4):
            for warps in (4, 8):
                for s in (1, 2, 4, 8):
                    plan = GemmPlan(m, n, warps, s, staged=True)
                    groups = (M // (16 * m)) * (N // (8 * n * warps)) * s if plan.fits(M, K, N) else 0
                    if 132 <= groups <= 4096 and (s == 1 or M * N * s <= 1 << 22):
                        out.append(plan)
    return out


def parse_plan(name: str):
    """A GemmPlan from its str(), e.g. m4n4w4s1u2l."""
    from worker_svc.tc_gemm import GemmPlan

    return GemmPlan(*map(int, re.findall(r"\d+", name)), staged=name.endswith("l"))


def around_measured(M: int, K: int, N: int) -> list:
    """The measured plan of this shape (worker_svc.tc_gemm.MEASURED_PLANS) with its split halved, kept and doubled;
    empty where none was measured."""
    from worker_svc.tc_gemm import MEASURED_PLANS

    plan = MEASURED_PLANS.get((M, K, N))
    if plan is None:
        return []
    return [replace(plan, split=s) for s in (plan.split, plan.split // 2, plan.split * 2) if s >= 1]


def time_variant(M: int, K: int, N: int, split, mats: int, reps: int, context: dict) -> float:
    """Microseconds per product: one captured graph of `mats` products on distinct weights (more bytes than the L2
    cache holds, as in a real step), replayed `reps` times. Each product's input depends on the previous product's
    output through one small elementwise kernel (included in the figure, as a norm or activation sits between a
    step's products), so the products run one after another, as in a step: independent kernels of a graph would
    overlap and hide a kernel's low occupancy. Timing a lone kernel instead leaves the GPU at low clocks."""
    from tinygrad import Tensor, TinyJit, dtypes

    ws = [Tensor.randn(N, K, dtype=dtypes.half).realize() for _ in range(mats)]
    x = Tensor.randn(M, K, dtype=dtypes.half).realize()

    @TinyJit
    def step(x: Tensor) -> Tensor:
        out = None
        for w in ws:
            inp = x if out is None else (x.float() + out[:, :1].float() * 1e-30).cast(x.dtype).contiguous()
            out = product(inp, w, split).realize()
        return out

    return replay_seconds(step, x, reps, context) / mats * 1e6


def replay_seconds(step, arg, reps: int, context: dict | None = None) -> float:
    """Seconds per call of a TinyJit function, replayed `reps` times after 3 calls that capture it (under
    tinygrad Context `context`, where the kernels get compiled)."""
    from tinygrad import Device
    from tinygrad.helpers import Context

    with Context(**(context or {})):
        for _ in range(3):
            step(arg)
    Device[Device.DEFAULT].synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step(arg)
    Device[Device.DEFAULT].synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="16,64,256,2048")
    ap.add_argument("--shapes", default="down,gate_up,qkv,o")
    ap.add_argument("--splits", default="0,1,2,4,8,16", help="0: the transposed product")
    ap.add_argument("--notc", action="store_true", help="also time each split without tensor cores")
    ap.add_argument("--beam", type=int, default=0, help="also time the best split with BEAM=N")
    ap.add_argument("--plans", action="store_true", help="also sweep the custom tensor-core kernel's plans")
    ap.add_argument("--plans-from", default="", help="time only the best 3 plans of each row of this --out file")
    ap.add_argument("--around-measured", action="store_true",
                    help="time tc_gemm.MEASURED_PLANS' plan of each row with its split halved, kept and doubled")
    ap.add_argument("--unrolls", default="1", help="with --plans-from or --around-measured: each plan at these "
                    "unrolls (chunks of K per loop iteration)")
    ap.add_argument("--staged", action="store_true", help="also time the plans that stage activations in shared "
                    "memory (staged_candidates)")
    ap.add_argument("--measured", action="store_true", help="also time the plan the worker uses (tc_gemm.plan_for)")
    ap.add_argument("--rounds", type=int, default=1, help="time each plan this many times, round-robin; keep the best")
    ap.add_argument("--mats", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from worker_svc.compat import configure_environment

    configure_environment(beam=0)
    results = []
    earlier = {}
    if args.plans_from:
        for row in json.load(open(args.plans_from)):
            best3 = list(row.get("plans", {}))[:3]  # plan names like m4n4w4s1, fastest first
            earlier[(row["shape"], row["M"])] = [parse_plan(p) for p in best3]
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        for M in map(int, args.rows.split(",")):
            row = dict(shape=name, M=M, K=K, N=N)
            for split in map(int, filter(None, args.splits.split(","))):
                variants = [("tc", dict())] + ([("notc", dict(TC=0))] if args.notc else [])
                for label, ctx in variants:
                    us = time_variant(M, K, N, split, args.mats, args.reps, ctx)
                    row[f"{label}_s{split}"] = us
            given = earlier.get((name, M)) or (around_measured(M, K, N) if args.around_measured else None)
            if given:
                given = [p for p in dict.fromkeys(replace(p, unroll=int(u)) for p in given
                                                  for u in args.unrolls.split(",")) if p.fits(M, K, N)]
            if args.measured or args.staged:
                from worker_svc.tc_gemm import plan_for

                extra = [*([plan_for(M, K, N)] if args.measured else []),
                         *(staged_candidates(M, K, N) if args.staged else [])]
                given = [*dict.fromkeys([*(given or []), *extra])]
            if args.plans or given:
                times = sweep_plans(M, K, N, args.mats, args.reps, given, args.rounds)
                ranked = sorted(times, key=times.get)
                row["plans"] = {str(p): round(times[p], 2) for p in ranked}
                row[f"kern_{ranked[0]}"] = times[ranked[0]]
            best = min((v, k) for k, v in row.items() if k.startswith(("tc_", "notc_", "kern_")))
            if args.beam:
                split = int(best[1].split("_s")[1])
                row[f"beam{args.beam}_s{split}"] = time_variant(M, K, N, split, args.mats, args.reps,
                                                               dict(BEAM=args.beam))
                best = min((v, k) for k, v in row.items() if k.startswith(("tc_", "notc_", "kern_", "beam")))
            row["best"], row["best_us"] = best[1], best[0]
            row["best_gbs"] = N * K * 2 / (best[0] * 1e-6) / 1e9
            row["best_tflops"] = 2 * M * N * K / (best[0] * 1e-6) / 1e12
            results.append(row)
            cells = "  ".join(f"{k}={v:.1f}" for k, v in row.items() if k.startswith(("tc_", "notc_", "kern_", "beam")))
            print(f"{name:>8} M={M:<5} {cells}  -> {row['best']} {row['best_us']:.1f} us, "
                  f"{row['best_gbs']:.0f} GB/s, {row['best_tflops']:.1f} TFLOP/s", flush=True)
            if args.out:  # after every row: a sweep cut short by a time limit keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
