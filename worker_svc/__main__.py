"""`python -m worker_svc --model DIR` (or `tinyvllm-worker`): load a checkpoint onto DEV's accelerator and serve it to a scheduler."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from shared.auth import resolve_secret
from shared.cli import HelpFormatter
from shared.service import PortTaken, check_port_free, setup_logging
from worker_svc.buckets import DEFAULT_DECODE_BATCH_SIZES, DEFAULT_PREFILL_SHAPES, parse_int_list, parse_shapes

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face Llama checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=None, help="default: the checkpoint's")
    ap.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks (overrides --kv-cache-gb)")
    ap.add_argument("--kv-cache-gb", type=float, default=4.0)
    ap.add_argument("--decode-batch-sizes", type=parse_int_list, default=DEFAULT_DECODE_BATCH_SIZES)
    ap.add_argument("--prefill-shapes", type=parse_shapes, default=DEFAULT_PREFILL_SHAPES, help="e.g. 1x128,4x128")
    ap.add_argument("--max-steps", type=int, default=8, help="decode steps one call may run")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"])
    ap.add_argument("--no-warm-up", action="store_true", help="capture graphs lazily (tests of warm-up only)")
    ap.add_argument("--beam", type=int, default=0,
                    help="BEAM kernel search width for captured kernels at warm-up (results cached on disk)")
    ap.add_argument("--tuning", default=None,
                    help="kernel tuning table (JSON, see `make tune`); default: tuning/<DEV>.json if it exists; "
                         "'none' to use tinygrad's heuristics alone")
    ap.add_argument("--no-capture-cache", action="store_true",
                    help="don't keep schedules and lowered kernels on disk (tinygrad's cache.db) for the next start")
    ap.add_argument("--worker-secret", default=None,
                    help="the secret the scheduler must present; default: $TINYVLLM_WORKER_SECRET, else the file "
                         "~/.cache/tinyvllm/worker-secret (created, mode 0600, on first start; see shared/auth.py)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    setup_logging(args.log_level)
    try:  # before minutes of loading and warming up
        check_port_free(args.host, args.port)
    except PortTaken as exc:
        raise SystemExit(f"worker: {exc}")
    from worker_svc.compat import configure_environment

    configure_environment(beam=args.beam)

    from worker_svc.engine import WorkerEngine, WorkerOptions
    from worker_svc.server import serve

    engine = WorkerEngine(WorkerOptions(
        model=args.model, block_size=args.block_size, max_context=args.max_context, kv_blocks=args.kv_blocks,
        kv_cache_gb=args.kv_cache_gb, decode_batch_sizes=args.decode_batch_sizes, prefill_shapes=args.prefill_shapes,
        max_steps=args.max_steps, dtype=args.dtype, warm_up=not args.no_warm_up, tuning=args.tuning,
        capture_cache=not args.no_capture_cache))
    server = serve(engine, args.host, args.port, resolve_secret(args.worker_secret))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()  # the call in progress finishes; new ones are refused
    # Exit now, skipping interpreter teardown: after a SIGTERM to the whole process group (systemd, `kill -- -PGID`)
    # had killed tinygrad's compile workers, the pool respawned them while the main thread waited on a lock in
    # multiprocessing's exit handlers, and the worker lived on for minutes. Compile workers left behind exit when
    # their task pipe closes.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
