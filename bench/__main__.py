"""`python -m bench` (`make bench`): tinyvllm through its public gRPC API, its worker alone, and peers.

Scenarios (through the scheduler, greedy, ignore_eos): (a) one stream, 128-token prompt, 256 new tokens;
(b) 64 concurrent streams, 128 in / 128 out; (c) 256 requests with seeded random lengths arriving at once.
Prints a table and writes JSON. `--shape tinyllama` builds a TinyLlama-1.1B-shaped fp16 checkpoint locally."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import platform
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """TINYVLLM_COMMIT when set (a copy of the tree without its git history, as on the GPU machine), else git's."""
    if os.environ.get("TINYVLLM_COMMIT"):
        return os.environ["TINYVLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def checkpoint_for(args) -> pathlib.Path:
    if args.model:
        return pathlib.Path(args.model)
    from shared.demo_checkpoint import build_checkpoint

    path = ROOT / ".cache" / f"bench-{args.shape}"
    if not (path / "config.json").exists():
        print(f"building a {args.shape}-shaped checkpoint in {path} ...", flush=True)
        build_checkpoint(path, shape=args.shape, dtype="float16" if args.shape == "tinyllama" else "float32")
    return path


def worker_flags(args) -> list[str]:
    flags = ["--decode-batch-sizes", args.decode_batch_sizes, "--prefill-shapes", args.prefill_shapes,
             "--max-steps", str(args.max_steps), "--kv-cache-gb", str(args.kv_cache_gb)]
    return flags + (["--beam", str(args.beam)] if args.beam else []) + args.worker_args.split()


def floor_fraction(result_a: dict, weight_bytes: int, kv_bytes_per_token: int, bandwidth_gbs: float) -> dict:
    """Memory-bandwidth floor for scenario (a): every step reads all weights plus the context's K and V."""
    mean_context = 128 + 256 / 2
    step_bytes = weight_bytes + kv_bytes_per_token * mean_context
    floor_ms = step_bytes / (bandwidth_gbs * 1e9) * 1e3
    return dict(step_bytes=step_bytes, floor_ms=floor_ms, floor_tok_s=1e3 / floor_ms,
                fraction_of_floor=floor_ms / result_a["tpot_ms_p50"])


def print_table(report: dict) -> None:
    print(f"\n== tinyvllm bench: {report['shape']} on {report['device']}, commit {report['commit']} ==")
    probes = ", ".join(f"{k} {v:.0f}" for k, v in report["bandwidth_probes_gbs"].items())
    print(f"measured bandwidth: {report['bandwidth_gbs']:.0f} GB/s (probes: {probes}); "
          f"weights {report['weight_bytes'] / 1e9:.3f} GB")
    print("\nworker only (no gRPC), decode at context 256:")
    print(f"{'rows':>5} {'step ms':>9} {'tok/s':>10} {'kernels':>8} {'(full)':>9} {'full ms':>9}")
    for d in report["worker"]["decode"]:
        print(f"{d['rows']:>5} {d['step_ms']:>9.3f} {d['tok_s']:>10.1f} {d['kernels_per_step']:>8} "
              f"{d['kernels_per_step_top_k_p']:>9} {d.get('step_ms_penalties_logprobs', 0):>9.3f}")
    if report.get("host"):
        from bench.host import print_rows

        print_rows(report["host"])
    for p in report["worker"]["prefill"]:
        print(f"prefill {p['rows']}x{p['tokens']}: {p['ms']:.2f} ms, {p['tok_s']:.0f} tok/s, {p['kernels']} kernels")
    print("\nthrough gRPC (scheduler + worker):")
    print(f"{'scenario':<24} {'tok/s':>9} {'req/s':>7} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} "
          f"{'busy':>6} {'grpc':>6}")
    for s in report["scenarios"]:
        grpc_share = s["grpc_share_of_call"]
        print(f"{s['scenario']:<24} {s['output_tok_s']:>9.1f} {s['requests_s']:>7.2f} {s['ttft_ms_p50']:>9.1f} "
              f"{s['ttft_ms_p99']:>8.1f} {s['tpot_ms_p50']:>9.2f} {s['tpot_ms_p99']:>8.2f} "
              f"{s['worker_busy_share_of_wall']:>6.0%} {grpc_share if grpc_share is None else f'{grpc_share:.0%}':>6}")
    if "floor" in report:
        f = report["floor"]
        print(f"\n(a) bandwidth floor {f['floor_ms']:.3f} ms/token ({f['floor_tok_s']:.0f} tok/s): "
              f"{f['fraction_of_floor']:.1%} of it reached")
    a = next((s for s in report["scenarios"] if "ttft_idle_ms_p50" in s), None)
    if a:
        print(f"idle TTFT p50 {a['ttft_idle_ms_p50']:.1f} ms: the worker call {a['ttft_idle_call_ms_p50']:.1f} ms "
              f"from the scheduler's send to its answer, of which the worker's own time "
              f"{a['ttft_idle_worker_ms_p50']:.1f} ms")
    if report.get("peers"):
        from bench.peers import print_ratios

        print_ratios(report)


def run_peers(args, checkpoint: str) -> list[dict]:
    """Rows {peer, figure, value, unit, source} of each peer named in --peer (bench/peers.py)."""
    from bench import peers

    rows: list[dict] = []
    for name in [p for p in args.peer.split(",") if p and p != "none"]:
        try:
            if name == "hf":
                from bench import peer_hf

                if not peer_hf.available():
                    print("--peer hf: torch and transformers are not installed here; skipped")
                    continue
                for r in peer_hf.run(checkpoint, [(1, 128, 256), (64, 128, 128)]):
                    src = f"generate batch {r['batch']} {r['prompt']}/{r['new']}"
                    figure = "decode_b1_tok_s" if r["batch"] == 1 else "streams64_tok_s"
                    rows.append(dict(peer="HF eager", figure=figure, value=r["output_tok_s"], unit="tok/s", source=src))
                    if r["batch"] == 1:
                        rows.append(dict(peer="HF eager", figure="prefill_128_ms", value=r["ttft_ms"], unit="ms",
                                         source=src))
            elif name == "llamacpp":
                rows += peers.llamacpp(checkpoint, args.llamacpp_src)
            elif name == "torch-compile":
                rows += peers.torch_compile()
            else:
                raise ValueError(f"unknown peer {name!r}")
        except Exception as exc:  # a peer that fails must not lose tinyvllm's own figures
            print(f"peer {name} failed: {exc}")
    return rows


def main() -> None:
    from worker_svc.buckets import DEFAULT_DECODE_BATCH_SIZES, DEFAULT_PREFILL_SHAPES, format_int_list, format_shapes

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="demo")
    ap.add_argument("--model", help="an existing checkpoint instead of a generated one")
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--peer", default="none", help="comma list of hf, llamacpp, torch-compile (bench/peers.py)")
    ap.add_argument("--llamacpp-src", default=str(ROOT / ".peers" / "llamacpp" / "src.tgz"),
                    help="llama.cpp sources packed by ../shared/peers/llamacpp/prepare.sh")
    ap.add_argument("--decode-batch-sizes", default=format_int_list(DEFAULT_DECODE_BATCH_SIZES))
    ap.add_argument("--prefill-shapes", default=format_shapes(DEFAULT_PREFILL_SHAPES))
    ap.add_argument("--max-steps", type=int, default=16, help="decode steps per worker call (worker --max-steps)")
    ap.add_argument("--kv-cache-gb", type=float, default=8.0)
    ap.add_argument("--beam", type=int, default=0)
    ap.add_argument("--worker-args", default="")
    ap.add_argument("--skip-worker-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench"))
    args = ap.parse_args()
    from worker_svc.compat import configure_environment

    configure_environment(beam=args.beam)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tinygrad import Device

    from bench import worker_only
    from bench.scenarios import run_scenarios
    from shared.processes import start_scheduler, start_worker
    from worker_svc.engine import WorkerEngine, WorkerOptions
    from worker_svc.buckets import parse_int_list, parse_shapes

    ckpt = checkpoint_for(args)
    report: dict = dict(shape=args.shape, device=Device.DEFAULT, host=platform.node(), commit=git_commit(),
                        time=time.strftime("%Y-%m-%d %H:%M:%S"), checkpoint=str(ckpt), args=vars(args))
    on_cpu = Device.DEFAULT == "CPU"
    probes = {"tinygrad": worker_only.measure_bandwidth(0.25 if on_cpu else 2.0, beam=0 if on_cpu else 2)}
    if Device.DEFAULT == "CUDA" and (torch_gbs := worker_only.torch_cuda_bandwidth(2.0)) is not None:
        probes["torch"] = torch_gbs
    report["bandwidth_probes_gbs"], report["bandwidth_gbs"] = probes, max(probes.values())
    print(f"bandwidth {report['bandwidth_gbs']:.0f} GB/s (best of {probes})", flush=True)

    engine = WorkerEngine(WorkerOptions(model=str(ckpt), decode_batch_sizes=parse_int_list(args.decode_batch_sizes),
                                        prefill_shapes=parse_shapes(args.prefill_shapes),
                                        max_steps=args.max_steps,
                                        kv_cache_gb=args.kv_cache_gb))
    cfg = engine.config
    report["weight_bytes"] = engine.weights.nbytes()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.kv_dim * engine.dtype.itemsize
    report["worker"] = {"decode": [], "prefill": []} if args.skip_worker_only else worker_only.measure(engine)
    max_context, vocab = engine.max_context, cfg.vocab_size
    del engine
    gc.collect()

    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    worker = start_worker(ckpt, log_dir, worker_flags(args))
    report["worker_restart_s"] = time.perf_counter() - t0  # compiled kernels cached by the worker-only run above
    print(f"worker serving {report['worker_restart_s']:.1f} s after its start (a restart: kernels cached)", flush=True)
    try:
        scheduler = start_scheduler(worker.address, log_dir)
        try:
            report["scenarios"] = asyncio.run(run_scenarios(scheduler.address, args.scenarios, vocab, max_context))
        finally:
            scheduler.stop()
    finally:
        worker.stop()
    a = next((s for s in report["scenarios"] if s["scenario"].startswith("a")), None)
    if a:
        report["floor"] = floor_fraction(a, report["weight_bytes"], kv_per_token, report["bandwidth_gbs"])

    from bench import host

    report["host"] = host.measure_all((ckpt / "tokenizer.model").read_bytes())
    report["peers"] = run_peers(args, str(ckpt))
    print_table(report)
    path = out_dir / f"bench-{args.shape}-{Device.DEFAULT.lower()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
