"""`python -m scheduler_svc.client "prompt"`: stream a completion from a running scheduler to the terminal."""
from __future__ import annotations

import argparse
import sys

import grpc

from tinyvllm.v1 import scheduler_pb2, scheduler_pb2_grpc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    args = ap.parse_args()

    params = scheduler_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, stop=args.stop)
    if args.seed is not None:
        params.seed = args.seed
    with grpc.insecure_channel(args.server) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        sys.stdout.write(args.prompt)
        for response in stub.Generate(scheduler_pb2.GenerateRequest(prompt=args.prompt, params=params)):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            if response.finish_reason:
                reason = scheduler_pb2.FinishReason.Name(response.finish_reason)
                print(f"\n[{reason}: {response.prompt_tokens} prompt + {response.completion_tokens} new tokens]",
                      file=sys.stderr)


if __name__ == "__main__":
    main()
