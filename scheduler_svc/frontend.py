"""The one entry point of both front doors (gRPC and HTTP): validate a GenerateRequest, admit it, stream its
responses, and account for it when it ends (metrics, one log line). An error is a RequestError carrying the gRPC
status code; the HTTP API maps that code to its HTTP status, so both doors refuse the same requests the same way."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from scheduler_svc import validation
from scheduler_svc.chat import ChatTemplateError
from scheduler_svc.engine import FINISH_NAMES, Engine
from scheduler_svc.metrics import EngineCollector, RequestMetrics
from scheduler_svc.sequence import Delta, Sequence
from tinyvllm.v1 import scheduler_pb2

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request refused before it ran: `code` says why (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# requests up to this size (serialized) are tokenized on the event loop, larger ones in a thread: 2 KB of text
# tokenizes in at most about 0.3 ms on the 2-core machine (the demo tokenizer), the time of a thread hand-off there
# and back, and a prompt of a few hundred tokens in much less
INLINE_REQUEST_BYTES = 2048


@dataclass
class Limits:
    """What one scheduler accepts before it answers RESOURCE_EXHAUSTED (flags of `python -m scheduler_svc`)."""

    max_request_mb: float = 4.0  # a GenerateRequest larger than this is refused by gRPC itself
    max_waiting: int = 1024  # requests queued for admission
    max_streams: int = 4096  # open Generate streams, running or waiting, over both front doors


class Frontend:
    """Owns what is per front-door request rather than per sequence: open-stream count, drain state, metrics."""

    def __init__(self, engine: Engine, limits: Limits):
        """engine: started (its worker info is known)."""
        self.engine = engine
        self.limits = limits
        self.metrics = RequestMetrics(engine.info.model_name)
        self.metrics.registry.register(EngineCollector(engine))  # /metrics: histograms + the engine's counters
        self.streams = 0  # open requests, gRPC and HTTP
        self.draining = False  # shutting down: new requests get UNAVAILABLE

    def _prompt_ids(self, request: scheduler_pb2.GenerateRequest) -> list[int]:
        """Tokenizes (or renders and tokenizes) and checks the input. Runs in a thread when the request is larger
        than INLINE_REQUEST_BYTES: a large prompt must not stall the event loop."""
        which = request.WhichOneof("input")
        engine = self.engine
        if which is None:
            raise _invalid("exactly one of prompt, prompt_token_ids or messages is required")
        if which == "prompt":
            ids = engine.tokenizer.encode(request.prompt)
        elif which == "messages":
            if engine.chat_template is None:
                raise _invalid(f"the model {engine.info.model_name!r} has no chat template; send a prompt instead")
            chat = request.messages
            messages = [{"role": m.role, "content": m.content} for m in chat.messages]
            add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
            try:
                text = engine.chat_template.render(messages, add_generation_prompt=add)
            except ChatTemplateError as exc:
                raise _invalid(str(exc)) from exc
            ids = engine.tokenizer.encode_rendered(text)
        limits = self._model_limits()
        try:
            if which == "prompt_token_ids":
                ids = validation.prompt_token_ids(request.prompt_token_ids.ids, limits)
            validation.prompt_length(ids, limits)
        except validation.InvalidRequest as exc:
            raise _invalid(str(exc)) from exc
        return ids

    def _model_limits(self) -> validation.ModelLimits:
        return validation.ModelLimits(vocab_size=self.engine.info.vocab_size, max_length=self.engine.max_length)

    def _refuse_if_unavailable(self) -> None:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        if self.engine.worker_down:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"no worker for over {self.engine.worker_timeout_s:g} s (--worker-timeout); "
                               "retry later")

    async def start(self, request: scheduler_pb2.GenerateRequest) -> "RequestStream":
        """Validates and admits one request; raises RequestError. The caller must iterate or close the stream."""
        self._refuse_if_unavailable()
        if self.streams >= self.limits.max_streams:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.streams} streams are open, the limit (--max-streams); retry later")
        if self.engine.counts()[1] >= self.limits.max_waiting:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.limits.max_waiting} requests are waiting, the limit (--max-waiting); "
                               "retry later")
        self.streams += 1  # counted from here: requests being tokenized are open streams too
        try:
            limits = self._model_limits()
            try:  # every field of the request is checked in scheduler_svc.validation
                sampling = validation.sampling(request.params, limits)
                priority = validation.priority(request)
                n = validation.num_samples(request.params)
            except validation.InvalidRequest as exc:
                raise _invalid(str(exc)) from exc
            # a small request is tokenized here: the thread's two hand-offs cost more than its tokenizing (about
            # 0.4 ms of an idle request's first token on the 2-core machine); a large one must not stall the loop
            if request.ByteSize() <= INLINE_REQUEST_BYTES:
                prompt_ids = self._prompt_ids(request)
            else:
                prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
            seqs = self.engine.new_sequences(request.request_id, prompt_ids, sampling, priority, n,
                                              request.cache_salt)
            self._refuse_if_unavailable()  # again: tokenizing took time
            seq = seqs[0]
            if self.engine.is_running(seq.request_id):
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request_id {seq.request_id!r} is already running")
        except BaseException:
            self.streams -= 1
            raise
        for sample in seqs:
            self.engine.submit(sample)
        return RequestStream(self, seqs)


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """Deltas waiting for one stream as one per sample, in order: a stream that fell behind (a slow client, or a
    scheduler busier than gRPC can write) sends fewer, larger messages with the same tokens and text."""
    merged: dict[int, Delta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = Delta(list(d.token_ids), d.text, d.finish, d.stop_reason,
                                    None if d.logprobs is None else list(d.logprobs), d.index, d.prompt_logprobs)
            continue
        m.token_ids += d.token_ids
        m.text += d.text
        m.finish, m.stop_reason = d.finish, d.stop_reason
        if d.logprobs is not None:
            m.logprobs = [*(m.logprobs or ()), *d.logprobs]
    return list(merged.values())


def response_message(seq: Sequence, delta: Delta, texts) -> scheduler_pb2.GenerateResponse:
    """The message that streams one delta of `seq` (its totals with the last); texts: token id -> text, for
    logprob entries (Tokenizer.texts)."""
    response = scheduler_pb2.GenerateResponse(request_id=seq.request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.index:
        response.index = delta.index
    if delta.logprobs is not None:
        _add_logprobs(response.logprobs, delta.logprobs, texts)
    if delta.prompt_logprobs is not None:
        _add_logprobs(response.prompt_logprobs, delta.prompt_logprobs, texts)
    if delta.finish:
        response.finish_reason = int(delta.finish)
        response.prompt_tokens = len(seq.prompt_ids)
        response.completion_tokens = seq.num_output
        response.stop_reason = delta.stop_reason
        response.cached_prompt_tokens = seq.cached_prompt_tokens
    return response


def _add_logprobs(entries, logprobs, texts) -> None:
    """Logprob entries (sampled or prompt tokens) as TokenLogprobs messages, each token with its text."""
    for lp in logprobs:
        entry = entries.add(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, text=texts[lp.token_id])
        for rank, (token_id, value) in enumerate(lp.top, 1):
            entry.top.add(token_id=token_id, logprob=value, rank=rank, text=texts[token_id])


class RequestStream:
    """One admitted request's responses (its n samples share one outbox; each message names its sample's index).
    close() (also at the end of iteration) aborts what has not finished (the client went away), and accounts for
    the request once: metrics and the one log line per request."""

    def __init__(self, frontend: Frontend, seqs: list[Sequence]):
        self.frontend, self.seqs, self.seq = frontend, seqs, seqs[0]
        self.first_token_at: float | None = None
        self.closed = False

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        running = len(self.seqs)
        outbox = self.seq.outbox
        try:
            while running:
                deltas = [await outbox.get()]
                while not outbox.empty():  # the stream fell behind: what waits goes out as one message per sample
                    deltas.append(outbox.get_nowait())
                for delta in deltas if len(deltas) == 1 else merge_deltas(deltas):
                    if (response := self._response(delta)).finish_reason:
                        running -= 1
                    yield response
        finally:
            self.close()

    def _response(self, delta: Delta) -> scheduler_pb2.GenerateResponse:
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return response_message(self.seqs[delta.index], delta, self.frontend.engine.tokenizer.texts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        frontend, seq = self.frontend, self.seq
        frontend.streams -= 1
        for sample in self.seqs:
            if not sample.finish:  # the client cancelled or disconnected
                frontend.engine.abort(sample)
        now = time.monotonic()
        reason = FINISH_NAMES[seq.finish]
        frontend.metrics.observe(seq.arrival, self.first_token_at, now, seq.num_output, reason)
        ttft = f"{self.first_token_at - seq.arrival:.3f}s" if self.first_token_at else "-"
        log.info("request %s finished: %d prompt + %d completion tokens, first token %s, %.3fs, %s%s",
                 seq.request_id.encode("unicode_escape").decode(), len(seq.prompt_ids), seq.num_output, ttft,
                 now - seq.arrival, reason,
                 f" ({seq.stop_reason})" if reason == "abort" and seq.stop_reason else "")
