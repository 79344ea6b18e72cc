"""Optional protection of the public API: TLS (a certificate and key) and a bearer token.

Both are off by default, for a server bound to 127.0.0.1. Once the scheduler listens on another interface, TLS
keeps prompts and outputs private on the wire and the token keeps strangers from spending the accelerator.
Health checks and reflection stay open (load balancers probe without credentials)."""
from __future__ import annotations

import hmac
import os
import pathlib

import grpc

TOKEN_ENV = "TINYVLLM_API_TOKEN"  # the token without a command-line flag (which `ps` would show)
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def resolve_token(flag: str | None) -> str:
    """The flag's value, else $TINYVLLM_API_TOKEN, else "" (no token required)."""
    return flag or os.environ.get(TOKEN_ENV, "")


def server_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext; one without the other is an error at start."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())])


class RequireBearerToken(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection without `authorization: Bearer <token>`: UNAUTHENTICATED,
    before any handler runs."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this server needs an API token: send the metadata 'authorization: Bearer <token>'")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return await continuation(handler_call_details)
        return self._refusal
