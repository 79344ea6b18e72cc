"""The OpenAI-compatible HTTP API (FastAPI), a second front door onto the same Frontend as gRPC.

Each request is mapped onto a GenerateRequest (openai_protocol) and goes through Frontend.start, so validation,
overload refusal and accounting are the gRPC path's; a RequestError's status code becomes the HTTP status (400,
429, 503) with OpenAI's JSON error body. A client that disconnects aborts its request, streamed or not."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from scheduler_svc.frontend import Frontend, RequestError, RequestStream
from scheduler_svc.metrics import CONTENT_TYPE, render
from scheduler_svc.openai_protocol import ChatCompletionRequest, CompletionRequest, Unsupported
from tinyvllm.v1 import scheduler_pb2

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNAVAILABLE: 503}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
              429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}
FINISH = {scheduler_pb2.FINISH_REASON_STOP: "stop", scheduler_pb2.FINISH_REASON_LENGTH: "length"}


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    """OpenAI's error shape, which the openai client turns into BadRequestError, RateLimitError, ..."""
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPE.get(status, "internal_error"),
                                   "param": None, "code": code}}, status_code=status)


class Aborted(Exception):
    """The request ended with FINISH_REASON_ABORT (shutdown, a worker failure): no complete answer exists."""


class ClientGone(Exception):
    """The client disconnected before its answer was complete: the request was aborted, nothing is sent."""


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(last: scheduler_pb2.GenerateResponse) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _collect(stream: RequestStream, http_request: Request) -> tuple[str, scheduler_pb2.GenerateResponse]:
    """The whole completion; aborts it if the client disconnects first (nobody would read the answer)."""

    async def gather() -> tuple[str, scheduler_pb2.GenerateResponse]:
        parts = []
        async for response in stream:
            parts.append(response.text)
            if response.finish_reason:
                return "".join(parts), response
        raise Aborted("the stream ended without a finish reason")

    async def disconnected() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        stream.close()
    if not work.done() or work.cancelled():
        raise ClientGone()
    text, last = work.result()
    if last.finish_reason == scheduler_pb2.FINISH_REASON_ABORT:
        raise Aborted(last.stop_reason or "the request was aborted")
    return text, last


def create_app(frontend: Frontend, token: str = "") -> FastAPI:
    """token: when set, /v1/ endpoints need `Authorization: Bearer <token>` (401 otherwise), as with vLLM's
    --api-key; /health and /metrics stay open for probes and scrapers, as over gRPC health stays open."""
    app = FastAPI(title="tinyvllm", docs_url=None, redoc_url=None, openapi_url=None)
    engine = frontend.engine
    started = int(time.time())
    max_body = int(frontend.limits.max_request_mb * 2**20)

    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token and request.url.path.startswith("/v1/") and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected):
            return error_response(401, "this server needs its API token: Authorization: Bearer <token>")
        return await call_next(request)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return error_response(413, f"the request body is larger than {max_body} bytes (--max-request-mb)")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(HTTP_STATUS.get(exc.code, 500), exc.message, exc.code.name.lower())

    @app.exception_handler(Unsupported)
    async def on_unsupported(_: Request, exc: Unsupported) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Aborted)
    async def on_aborted(_: Request, exc: Aborted) -> JSONResponse:
        return error_response(503, f"the request was aborted: {exc}")

    @app.exception_handler(ClientGone)
    async def on_client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": for the record, nobody reads it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    def check_model(name: str) -> None:
        if name != engine.info.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"the model {name!r} does not exist; this server serves {engine.info.model_name!r}")

    @app.get("/health")
    async def health() -> Response:
        if frontend.draining:
            return error_response(503, "the server is shutting down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(frontend.metrics.registry), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.info.model_name, "object": "model", "created": started,
                                            "owned_by": "tinyvllm", "max_model_len": engine.max_length}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request) -> Response:
        check_model(body.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await frontend.start(body.to_generate(request_id))
        created = int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            def chunk(text: str, finish: str | None) -> dict:
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return _stream_response(stream, chunk, base, body.include_usage)
        text, last = await _collect(stream, http_request)
        return JSONResponse({**base, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": FINISH[last.finish_reason]}],
                             "usage": _usage(last)})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request) -> Response:
        check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await frontend.start(body.to_generate(request_id, engine.max_length))
        created = int(time.time())
        base = {"id": request_id, "object": "chat.completion", "created": created, "model": body.model}
        if body.stream:
            chunk_base = {**base, "object": "chat.completion.chunk"}

            def chunk(text: str, finish: str | None, role: bool = False) -> dict:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                return {**chunk_base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}]}
            return _stream_response(stream, chunk, chunk_base, body.include_usage, opening=chunk("", None, True))
        text, last = await _collect(stream, http_request)
        return JSONResponse({**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "logprobs": None, "finish_reason": FINISH[last.finish_reason]}],
                             "usage": _usage(last)})

    return app


def _stream_response(stream: RequestStream, chunk, base: dict, include_usage: bool,
                     opening: dict | None = None) -> StreamingResponse:
    """Server-sent events: one chunk per response message, the usage chunk if asked, then `data: [DONE]`. A client
    that disconnects cancels the generator (Starlette watches for it), and close() aborts the request; close() also
    runs as the response's background task, for a client gone before the first chunk."""

    async def events() -> AsyncIterator[str]:
        try:
            if opening is not None:
                yield _sse(opening)
            async for response in stream:
                if response.finish_reason == scheduler_pb2.FINISH_REASON_ABORT:
                    yield _sse({"error": {"message": f"the request was aborted: {response.stop_reason}",
                                          "type": ERROR_TYPE[503], "param": None, "code": None}})
                    break
                finish = FINISH.get(response.finish_reason)
                if response.text or finish:
                    yield _sse(chunk(response.text, finish))
                if finish and include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(response)})
            yield _sse("[DONE]")
        finally:
            stream.close()

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(stream.close),
                             headers={"Cache-Control": "no-cache"})
