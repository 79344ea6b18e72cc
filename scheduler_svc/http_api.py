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


def _usage(lasts: list[scheduler_pb2.GenerateResponse]) -> dict:
    """The prompt once, the completion tokens of every choice (as OpenAI counts n choices)."""
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries, offset: int) -> dict:
    """The completions API's (legacy) logprobs of some tokens: their text, log-probability, top alternatives by
    text, and where each starts in the choice's text (`offset`: the characters before the first)."""
    tokens = [e.text for e in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.text: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


def chat_logprobs(entries) -> dict:
    """The chat API's logprobs of some tokens: text, log-probability, UTF-8 bytes and the top alternatives."""
    def one(e) -> dict:
        return {"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode())}
    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries]}


def prompt_logprobs_json(entries) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then per prompt token a map from token id to its
    logprob, rank and decoded_token, for the prompt token itself (first) and its top alternatives."""
    def one(e) -> dict:
        return {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.text}
    return [None, *({str(e.token_id): one(e), **{str(t.token_id): one(t) for t in e.top if t.token_id != e.token_id}}
                    for e in entries)]


class Choice:
    """One sample's whole answer (a non-streamed request): its text, logprob entries and last message."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list = []
        self.prompt_logprobs: list = []  # sample 0's only: they are the request's
        self.last: scheduler_pb2.GenerateResponse | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def _collect(stream: RequestStream, http_request: Request) -> list[Choice]:
    """Every choice of the completion, by index; aborts the request if the client disconnects first (nobody would
    read the answer)."""

    async def gather() -> list[Choice]:
        choices = [Choice() for _ in stream.seqs]
        async for response in stream:
            choice = choices[response.index]
            choice.parts.append(response.text)
            choice.logprobs.extend(response.logprobs)
            choice.prompt_logprobs.extend(response.prompt_logprobs)
            if response.finish_reason:
                choice.last = response
        if any(c.last is None for c in choices):
            raise Aborted("the stream ended without a finish reason")
        return choices

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
    choices = work.result()
    for choice in choices:
        if choice.last.finish_reason == scheduler_pb2.FINISH_REASON_ABORT:
            raise Aborted(choice.last.stop_reason or "the request was aborted")
    return choices


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
        wants_logprobs = body.logprobs is not None
        if body.stream:
            offsets = [0] * len(stream.seqs)  # characters streamed so far, per choice

            def chunk(response: scheduler_pb2.GenerateResponse, finish: str | None) -> dict:
                logprobs = None
                if wants_logprobs:
                    logprobs = completion_logprobs(response.logprobs, offsets[response.index])
                    offsets[response.index] += sum(len(e.text) for e in response.logprobs)
                return {**base, "choices": [{"index": response.index, "text": response.text, "logprobs": logprobs,
                                             "finish_reason": finish}]}
            return _stream_response(stream, chunk, base, body.include_usage)
        choices = await _collect(stream, http_request)
        prompt_logprobs = (prompt_logprobs_json(choices[0].prompt_logprobs) if body.prompt_logprobs is not None
                           else None)  # every choice's, as vLLM's completions
        return JSONResponse({**base, "choices": [
            {"index": i, "text": c.text, "logprobs": completion_logprobs(c.logprobs, 0) if wants_logprobs else None,
             "finish_reason": FINISH[c.last.finish_reason], "prompt_logprobs": prompt_logprobs}
            for i, c in enumerate(choices)], "usage": _usage([c.last for c in choices])})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request) -> Response:
        check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await frontend.start(body.to_generate(request_id, engine.max_length))
        created = int(time.time())
        base = {"id": request_id, "object": "chat.completion", "created": created, "model": body.model}
        wants_logprobs = body.logprobs
        if body.stream:
            chunk_base = {**base, "object": "chat.completion.chunk"}

            def chunk(response: scheduler_pb2.GenerateResponse, finish: str | None) -> dict:
                delta = {"content": response.text} if response.text else {}
                logprobs = chat_logprobs(response.logprobs) if wants_logprobs else None
                return {**chunk_base, "choices": [{"index": response.index, "delta": delta, "logprobs": logprobs,
                                                   "finish_reason": finish}]}
            openings = [{**chunk_base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}
                        for i in range(len(stream.seqs))]
            return _stream_response(stream, chunk, chunk_base, body.include_usage, openings)
        choices = await _collect(stream, http_request)
        return JSONResponse({**base, "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": chat_logprobs(c.logprobs) if wants_logprobs else None,
             "finish_reason": FINISH[c.last.finish_reason]} for i, c in enumerate(choices)],
            "usage": _usage([c.last for c in choices]),
            # the request's, once, as vLLM's chat API
            "prompt_logprobs": (prompt_logprobs_json(choices[0].prompt_logprobs) if body.prompt_logprobs is not None
                                else None)})

    return app


def _stream_response(stream: RequestStream, chunk, base: dict, include_usage: bool,
                     openings: list[dict] = ()) -> StreamingResponse:
    """Server-sent events: one chunk per response message (each names its choice's index), the usage chunk once
    every choice has finished if asked, then `data: [DONE]`. A client that disconnects cancels the generator
    (Starlette watches for it), and close() aborts the request; close() also runs as the response's background
    task, for a client gone before the first chunk."""

    async def events() -> AsyncIterator[str]:
        try:
            for opening in openings:
                yield _sse(opening)
            lasts = []
            async for response in stream:
                if response.finish_reason == scheduler_pb2.FINISH_REASON_ABORT:
                    yield _sse({"error": {"message": f"the request was aborted: {response.stop_reason}",
                                          "type": ERROR_TYPE[503], "param": None, "code": None}})
                    break
                finish = FINISH.get(response.finish_reason)
                if response.text or finish or response.logprobs:
                    yield _sse(chunk(response, finish))
                if finish:
                    lasts.append(response)
            else:
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(lasts)})
            yield _sse("[DONE]")
        finally:
            stream.close()

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(stream.close),
                             headers={"Cache-Control": "no-cache"})
