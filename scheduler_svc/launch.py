"""`python -m scheduler_svc.launch --model DIR`: a worker and a scheduler together, for a demo; Ctrl-C stops both."""
from __future__ import annotations

import argparse
import pathlib
import signal
import threading

from shared.processes import start_services


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--worker-port", type=int, default=50061)
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--worker-args", default="", help="extra worker flags, as one string")
    args = ap.parse_args()

    worker, scheduler = start_services(pathlib.Path(args.model), None, args.worker_args.split(),
                                       worker_port=args.worker_port, port=args.port)
    print(f"\ntinyvllm is serving on {scheduler.address}; try:\n"
          f"  python3 -m scheduler_svc.client --server {scheduler.address} \"Once upon a time\"\n", flush=True)
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
