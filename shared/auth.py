"""The shared secret between a scheduler and its worker: only the scheduler may drive the worker.

Any local process could otherwise call the worker's Execute and overwrite KV blocks of other clients' streams. The
worker accepts Execute and GetWorkerInfo only with the secret in the call's metadata (health checks and reflection
stay open, for readiness probes). Both services find the secret the same way, so the documented commands need no
extra arguments: a flag (`--worker-secret`), else TINYVLLM_WORKER_SECRET, else a file readable only by this user,
created by whichever service starts first (`~/.cache/tinyvllm/worker-secret`, or TINYVLLM_WORKER_SECRET_FILE).
"""
from __future__ import annotations

import collections
import hmac
import os
import pathlib
import secrets

import grpc

METADATA_KEY = "x-tinyvllm-worker-secret"
ENV, FILE_ENV = "TINYVLLM_WORKER_SECRET", "TINYVLLM_WORKER_SECRET_FILE"
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def secret_file() -> pathlib.Path:
    return pathlib.Path(os.environ.get(FILE_ENV) or pathlib.Path.home() / ".cache" / "tinyvllm" / "worker-secret")


def resolve_secret(flag: str | None = None) -> str:
    """The flag's value, else the environment's, else the secret file's (created with mode 0600 if missing)."""
    if flag:
        return flag
    if os.environ.get(ENV):
        return os.environ[ENV]
    path = secret_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by other users; chmod 600 it")
    secret = path.read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def call_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, secret),)


class RequireSecret(grpc.ServerInterceptor):
    """Refuses every call but health and reflection without the secret: UNAUTHENTICATED, before any handler runs."""

    def __init__(self, secret: str):
        self._secret = secret.encode()

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"this worker serves only its scheduler: send the shared secret as {METADATA_KEY!r}")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY, "")
        if hmac.compare_digest(sent.encode(), self._secret):
            return continuation(handler_call_details)
        return self._refusal


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _AddSecret(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, secret: str):
        self._metadata = call_metadata(secret)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = tuple(details.metadata or ()) + self._metadata
        return continuation(_CallDetails(details.method, details.timeout, metadata, details.credentials,
                                         details.wait_for_ready, details.compression), request)


def worker_channel(address: str, secret: str | None = None, options: list | None = None) -> grpc.Channel:
    """A (blocking) channel to a worker whose unary calls carry the secret: for tools and tests that drive a worker
    directly. The scheduler's own asyncio channel passes `call_metadata` on each call instead."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=options or []),
                                  _AddSecret(resolve_secret(secret)))
