"""`python -m scheduler_svc.launch --model DIR` (or `tinyvllm-demo`): a worker and a scheduler together, for a demo;
Ctrl-C stops both."""
from __future__ import annotations

import argparse
import pathlib
import signal
import threading

from shared.cli import HelpFormatter
from shared.processes import start_services


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face Llama checkpoint directory")
    ap.add_argument("--worker-port", type=int, default=50061)
    ap.add_argument("--port", type=int, default=50051, help="the scheduler's gRPC port")
    ap.add_argument("--http-port", type=int, default=8000, help="the scheduler's HTTP port (OpenAI API); 0: off")
    ap.add_argument("--worker-args", default="", help="extra worker flags, as one string")
    args = ap.parse_args()

    print("starting the worker: it loads the model and compiles its kernels once (tens of seconds on a 2-core CPU, "
          "about 12 s a bucket on a GPU); the scheduler starts when it is ready", flush=True)
    worker, scheduler = start_services(pathlib.Path(args.model), None, args.worker_args.split(),
                                       worker_port=args.worker_port, port=args.port, http_port=args.http_port)
    lines = [f"\ntinyvllm is serving gRPC on {scheduler.address}; try:",
             f"  tinyvllm-client --server {scheduler.address} \"Once upon a time\"",
             f"  tinyvllm-client --server {scheduler.address} --chat \"Tell me a story\""]
    if scheduler.http_url:
        lines += [f"and the OpenAI API on {scheduler.http_url}/v1 (metrics: {scheduler.http_url}/metrics):",
                  f"  curl {scheduler.http_url}/v1/models"]
    print("\n".join(lines) + "\n", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if worker.proc.poll() is not None or scheduler.proc.poll() is not None:
                print("a service exited; stopping")
                break
    finally:
        scheduler.stop()
        worker.stop()


if __name__ == "__main__":
    main()
