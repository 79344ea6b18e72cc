"""`tinyvllm-client "prompt"` (or `python -m scheduler_svc.client`): stream a completion from a running scheduler to
the terminal. With --chat the prompt is a user message, rendered with the model's chat template by the server."""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

import grpc

from scheduler_svc.security import TOKEN_ENV, resolve_token
from shared.cli import HelpFormatter
from tinyvllm.v1 import scheduler_pb2, scheduler_pb2_grpc

# C0 and C1 control characters other than newline and tab, DEL included: printed as \x1b etc. so generated text
# (a random model writes any byte) can never move the cursor, change colours or clear the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def build_request(args: argparse.Namespace) -> scheduler_pb2.GenerateRequest:
    params = scheduler_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, min_tokens=args.min_tokens)
    if args.seed is not None:
        params.seed = args.seed
    request = scheduler_pb2.GenerateRequest(params=params)
    if args.chat:
        if args.system:
            request.messages.messages.add(role="system", content=args.system)
        request.messages.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    return request


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    ap.add_argument("--server", default="127.0.0.1:50051", help="the scheduler's gRPC address")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a chat message (the model's template)")
    ap.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 is off")
    ap.add_argument("--seed", type=int, default=None, help="the same seed gives the same tokens (default: a random seed)")
    ap.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable); not printed")
    ap.add_argument("--stop-token-id", type=int, action="append", default=[],
                    help="stop after this token id (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-sequence token")
    ap.add_argument("--min-tokens", type=int, default=0, help="EOS and stop ids are ignored until this many tokens")
    ap.add_argument("--timeout", type=float, default=None, help="seconds the whole request may take (default: no limit)")
    ap.add_argument("--tls-ca", default=None, help="PEM file of the CA (or self-signed certificate) to trust: use TLS")
    ap.add_argument("--api-token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    token = resolve_token(args.api_token)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    channel = (grpc.secure_channel(args.server, grpc.ssl_channel_credentials(pathlib.Path(args.tls_ca).read_bytes()))
               if args.tls_ca else grpc.insecure_channel(args.server))
    with channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.Generate(request, timeout=args.timeout, metadata=metadata)
        try:
            if not args.chat:
                sys.stdout.write(escape_controls(args.prompt))
            for response in call:
                sys.stdout.write(escape_controls(response.text))
                sys.stdout.flush()
                if response.finish_reason:
                    reason = scheduler_pb2.FinishReason.Name(response.finish_reason)
                    why = f" ({escape_controls(response.stop_reason)})" if response.stop_reason else ""
                    print(f"\n[{reason}{why}: {response.prompt_tokens} prompt + {response.completion_tokens} new "
                          "tokens]", file=sys.stderr)
        except KeyboardInterrupt:
            call.cancel()  # the server aborts the request and frees its blocks
            print("\n[interrupted]", file=sys.stderr)
            return 130
        except grpc.RpcError as exc:
            print(f"\nerror: {describe(exc, args.server)}", file=sys.stderr)
            return 1
    return 0


def describe(exc: grpc.RpcError, server: str) -> str:
    """One line: the status and the server's message (a refused connection says where it tried)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = f"no scheduler at {server} ({details.splitlines()[0]})"
    return f"{code.name if code else 'ERROR'}: {escape_controls(' '.join(details.split()))}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sys.exit(run(args))
    except KeyboardInterrupt:  # Ctrl-C outside the stream (while connecting)
        print("\n[interrupted]", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
