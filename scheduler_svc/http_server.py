"""Runs the HTTP API with uvicorn on the scheduler's own asyncio loop, beside the gRPC aio server: both front doors
then share the engine's single-threaded state without locks or threads."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from scheduler_svc.frontend import Frontend
from scheduler_svc.http_api import create_app

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the scheduler's handlers (__main__) drain both front doors."""

    def capture_signals(self):
        return contextlib.nullcontext()


def _bind(host: str, port: int) -> socket.socket:
    """Bound here, not by uvicorn, so a taken port is a clear error at start instead of uvicorn's sys.exit."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"could not bind HTTP {host}:{port}: {exc.strerror}") from exc
    return sock


class HttpServer:
    def __init__(self, server: _EmbeddedServer, task: asyncio.Task, port: int):
        self.server, self.task, self.port = server, task, port

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_http(frontend: Frontend, host: str, port: int, token: str = "",
                     tls: tuple[str, str] | None = None) -> HttpServer:
    """token: the API token /v1/ needs (the gRPC API's --api-token); tls: (certificate, key) PEM files, the same
    ones the gRPC API serves, so neither front door is weaker than the other."""
    sock = _bind(host, port)
    cert, key = tls or (None, None)
    config = uvicorn.Config(create_app(frontend, token), log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, log_level="warning", ssl_certfile=cert, ssl_keyfile=key)
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server stopped at start")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("scheduler serving HTTP (OpenAI API, /metrics) on %s://%s:%d", "https" if tls else "http", host, bound)
    return HttpServer(server, task, bound)
