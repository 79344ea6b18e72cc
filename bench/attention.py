"""`python -m bench.attention`: which launch shape of the fused paged-attention kernel is fastest here.

worker_svc.paged_attention picks threads per workgroup (T) and query heads per workgroup (Gw) from the batch size
alone. This script times the kernel, per (rows, context), at every T and Gw given, the way a decode step runs it:
one captured graph of `--layers` calls on distinct pools, each call's query depending on the previous call's
output, replayed `--reps` times. It prints microseconds per call and the GB/s of K and V read.
"""
from __future__ import annotations

import argparse
import json


def time_attention(B: int, ctx: int, threads: int | None, gw: int | None, layers: int, reps: int,
                   KV: int = 4, G: int = 8, hd: int = 64, block: int = 16) -> float:
    """Microseconds per attention call of B rows at context `ctx` (every row's position ctx - 1)."""
    import numpy as np
    from tinygrad import Tensor, TinyJit, dtypes

    from bench.gemm import replay_seconds
    from worker_svc.paged_attention import paged_decode_attention

    nb = ctx // block
    pools = [Tensor.randn(2, B * nb * block, KV * hd, dtype=dtypes.half).realize() for _ in range(layers)]
    tables = Tensor(np.random.permutation(B * nb).reshape(B, nb).astype(np.int32)).realize()
    positions = Tensor.full((B,), ctx - 1, dtype=dtypes.int32).contiguous().realize()
    q = Tensor.randn(B, KV * G * hd, dtype=dtypes.half).realize()

    @TinyJit
    def step(q: Tensor) -> Tensor:
        for pool in pools:
            out = paged_decode_attention(q, pool, tables, positions, nb, block, KV, hd, num_heads=KV * G,
                                         out_dtype=dtypes.half, max_threads=threads, heads_per_group=gw)
            q = out.reshape(B, -1).contiguous().realize()
        return q

    return replay_seconds(step, q, reps) / layers * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--threads", default="0,64,128,256", help="0: the kernel's own choice")
    ap.add_argument("--heads-per-group", default="0,1,2,4,8", help="0: the kernel's own choice")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from worker_svc.compat import configure_environment

    configure_environment(beam=0)
    results = []
    for B in map(int, args.rows.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            kv_bytes = B * ctx * 2 * 4 * 64 * 2  # K and V of 4 KV heads of 64, fp16: time_attention's defaults
            row: dict = dict(rows=B, context=ctx)
            for t in map(int, args.threads.split(",")):
                for g in map(int, args.heads_per_group.split(",")):
                    if (t == 0) != (g == 0):
                        continue  # the default is the kernel's own (T, Gw) pair
                    try:
                        us = time_attention(B, ctx, t or None, g or None, args.layers, args.reps)
                    except (AssertionError, RuntimeError) as exc:  # a shape that does not fit shared memory
                        print(f"  B={B} ctx={ctx} T={t} Gw={g}: {exc}")
                        continue
                    row["default" if t == 0 else f"t{t}g{g}"] = round(us, 2)
            best = min((v, k) for k, v in row.items() if isinstance(v, float))
            row["best"], row["best_us"], row["best_gbs"] = best[1], best[0], kv_bytes / (best[0] * 1e-6) / 1e9
            results.append(row)
            cells = "  ".join(f"{k}={v}" for k, v in row.items() if k == "default" or k.startswith("t"))
            print(f"B={B:<4} ctx={ctx:<5} {cells}  -> {best[1]} {best[0]:.1f} us, {row['best_gbs']:.0f} GB/s",
                  flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
