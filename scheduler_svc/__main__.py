"""`python -m scheduler_svc --worker HOST:PORT` (or `tinyvllm-scheduler`): the public tinyvllm API in front of one
worker, over gRPC and over HTTP (OpenAI-compatible, plus /health and /metrics)."""
from __future__ import annotations

import argparse
import asyncio
import signal

from scheduler_svc.engine import STREAM_BUFFER, WORKER_TIMEOUT_S, Engine
from scheduler_svc.scheduler import MAX_STREAM_INTERVAL, STREAM_ROWS
from scheduler_svc.frontend import Frontend, Limits
from scheduler_svc.server import drain, serve
from scheduler_svc.security import TOKEN_ENV, resolve_token, server_credentials
from shared.auth import resolve_secret
from shared.cli import HelpFormatter
from shared.service import PortTaken, check_port_free, setup_logging


async def run(args: argparse.Namespace) -> None:
    # what can be wrong with the flags is found before waiting (minutes, at times) for the worker
    try:
        for port in (args.port, args.http_port):
            check_port_free(args.host, port)
    except PortTaken as exc:
        raise SystemExit(f"scheduler: {exc}")
    credentials, token = server_credentials(args.tls_cert, args.tls_key), resolve_token(args.api_token)
    engine = Engine(args.worker, secret=resolve_secret(args.worker_secret), worker_timeout_s=args.worker_timeout,
                    stream_buffer=args.max_stream_buffer, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, stream_interval=args.stream_interval)
    await engine.start(connect_timeout_s=args.connect_timeout)
    limits = Limits(max_request_mb=args.max_request_mb, max_waiting=args.max_waiting, max_streams=args.max_streams)
    frontend = Frontend(engine, limits)
    http = None
    if args.http_port:
        from scheduler_svc.http_server import start_http  # FastAPI and uvicorn load only when HTTP is on

        http = await start_http(frontend, args.host, args.http_port, token,
                                (args.tls_cert, args.tls_key) if credentials else None)
    server, _ = await serve(frontend, args.host, args.port, credentials, token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain(frontend, grace_s=args.shutdown_grace)
    if http:
        await http.stop()
    await server.stop(grace=1)
    await engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--worker", default="127.0.0.1:50061", help="the worker's address")
    ap.add_argument("--host", default="127.0.0.1", help="address both gRPC and HTTP listen on")
    ap.add_argument("--port", type=int, default=50051, help="gRPC port")
    ap.add_argument("--http-port", type=int, default=8000, help="HTTP port (OpenAI API, /health, /metrics); 0: off")
    ap.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S,
                    help="seconds running requests wait for a lost worker's return before they end with "
                         "FINISH_REASON_ABORT; after that, new requests get UNAVAILABLE until it is back")
    ap.add_argument("--connect-timeout", type=float, default=900.0, help="seconds to wait for the worker to be ready")
    defaults = Limits()
    ap.add_argument("--max-request-mb", type=float, default=defaults.max_request_mb,
                    help="largest request accepted (larger: RESOURCE_EXHAUSTED from gRPC, HTTP 413)")
    ap.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                    help="requests queued for admission; beyond: RESOURCE_EXHAUSTED (HTTP 429) at once")
    ap.add_argument("--max-streams", type=int, default=defaults.max_streams,
                    help="open requests, gRPC and HTTP; beyond: RESOURCE_EXHAUSTED (HTTP 429) at once")
    ap.add_argument("--max-stream-buffer", type=int, default=STREAM_BUFFER,
                    help="messages a stream may hold for a client that reads slowly; beyond: the request ends "
                         "with FINISH_REASON_ABORT")
    ap.add_argument("--shutdown-grace", type=float, default=5.0,
                    help="seconds streams get to finish on SIGTERM before they end with FINISH_REASON_ABORT")
    ap.add_argument("--worker-secret", default=None,
                    help="the worker's secret; default: $TINYVLLM_WORKER_SECRET, else ~/.cache/tinyvllm/worker-secret")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="sequences running at once (default and upper bound: the worker's largest decode bucket)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="tokens one worker call may compute (prefill chunks summed, one per decode row); default: "
                         "the largest prefill bucket's rows x tokens")
    ap.add_argument("--stream-interval", type=int, default=0,
                    help="tokens per stream message (vLLM's --stream-interval; first and last tokens go at once); "
                         f"0 (default): by load, every token up to {STREAM_ROWS} running sequences, then about "
                         f"{STREAM_ROWS} messages per step, at most {MAX_STREAM_INTERVAL} tokens per message")
    ap.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve the gRPC API over TLS")
    ap.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    ap.add_argument("--api-token", default=None,
                    help=f"every gRPC call must carry 'authorization: Bearer <token>' (UNAUTHENTICATED otherwise; "
                         f"health checks stay open); default: ${TOKEN_ENV}, else no token")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    setup_logging(args.log_level)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
