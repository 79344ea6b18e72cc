"""OpenAI request bodies (pydantic) and their mapping onto the gRPC GenerateRequest, so the HTTP API has no
validator of its own: what the fields mean is checked once, in scheduler_svc.validation.

`n` and `logprobs` (completions: the number of alternatives; chat: `logprobs` and `top_logprobs`) map onto the
gRPC fields of the same meaning, as does vLLM's `prompt_logprobs` (refused with `stream: true` when above 0, as
vLLM refuses it). Fields OpenAI defines that the HTTP API does not honour (echo, suffix, best_of,
tools) are refused with a 400 that names them, rather than silently ignored; fields it does not know are ignored,
as vLLM does, so clients that send extras keep working."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from tinyvllm.v1 import scheduler_pb2


class Unsupported(ValueError):
    """A request field that tinyvllm does not implement: HTTP 400."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    min_tokens: int = 0  # vLLM's extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None  # vLLM's extension
    min_p: float | None = None  # vLLM's extension
    allowed_token_ids: list[int] | None = None  # vLLM's extension
    priority: int | None = None  # vLLM's extension
    prompt_logprobs: int | None = None  # vLLM's extension: alternatives per prompt token (not streamed)
    user: str | None = None

    def _check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options is only allowed with stream: true")

    def sampling_params(self, max_tokens: int | None) -> scheduler_pb2.SamplingParams:
        """The same fields as the gRPC API; range checks happen there (scheduler_svc.validation)."""
        self._check_supported()
        p = scheduler_pb2.SamplingParams()
        if max_tokens is not None:
            if max_tokens < 1:
                raise Unsupported("max_tokens must be at least 1")
            p.max_tokens = max_tokens
        if self.temperature is not None:
            p.temperature = self.temperature
        if self.top_p is not None:
            p.top_p = self.top_p
        if self.top_k is not None:
            p.top_k = self.top_k
        if self.seed is not None:
            p.seed = self.seed % 2**64  # OpenAI's seed may be negative
        if self.stop is not None:
            p.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.stop_token_ids:
            p.stop_token_ids.extend(self.stop_token_ids)
        p.ignore_eos = self.ignore_eos
        if self.min_tokens < 0:
            raise Unsupported("min_tokens must be >= 0")
        p.min_tokens = self.min_tokens
        for field in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            if (value := getattr(self, field)) is not None:
                setattr(p, field, value)
        for token, bias in (self.logit_bias or {}).items():
            if not token.lstrip("-").isdigit():
                raise Unsupported(f"logit_bias: keys are token ids, not {token!r}")
            p.logit_bias[int(token)] = bias
        if self.allowed_token_ids:
            p.allowed_token_ids.extend(self.allowed_token_ids)
        if self.n < 1:
            raise Unsupported("n must be at least 1")
        p.n = min(self.n, 2**32 - 1)  # at most 64: checked with the gRPC API's fields
        if (top := self.logprobs_wanted()) is not None:
            if top < 0:
                raise Unsupported("logprobs must be >= 0")
            p.logprobs = min(top, 2**32 - 1)  # at most 20, likewise
        if self.prompt_logprobs is not None:
            if self.prompt_logprobs < 0:
                raise Unsupported("prompt_logprobs must be >= 0 (-1, the whole vocabulary, is not supported)")
            if self.stream and self.prompt_logprobs > 0:
                raise Unsupported("prompt_logprobs are not available with stream: true")
            p.prompt_logprobs = min(self.prompt_logprobs, 2**32 - 1)  # at most 20, likewise
        return p

    def logprobs_wanted(self) -> int | None:
        """Alternatives per token the request asks for; None: no logprobs."""
        return None

    def generate_request(self, request_id: str, max_tokens: int | None) -> scheduler_pb2.GenerateRequest:
        req = scheduler_pb2.GenerateRequest(request_id=request_id, params=self.sampling_params(max_tokens))
        if self.priority is not None:
            req.priority = self.priority
        return req

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def to_generate(self, request_id: str) -> scheduler_pb2.GenerateRequest:
        if self.echo:
            raise Unsupported("echo is not supported")
        if self.suffix:
            raise Unsupported("suffix is not supported")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of: only 1 is supported")
        req = self.generate_request(request_id, self.max_tokens)
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise Unsupported("prompt: only one prompt per request is supported")
            prompt = prompt[0]
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.ids.extend(prompt)
        return req


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    add_generation_prompt: bool = True  # vLLM's extension

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_generate(self, request_id: str, max_length: int) -> scheduler_pb2.GenerateRequest:
        """max_length: unset max tokens mean "until the context is full", as in vLLM's chat API."""
        if self.tools:
            raise Unsupported("tools are not supported")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        max_tokens = max_length if max_tokens is None else max_tokens
        req = self.generate_request(request_id, max_tokens)
        req.messages.add_generation_prompt = self.add_generation_prompt
        for m in self.messages:
            req.messages.messages.add(role=m.role, content=m.text())
        if not self.messages:
            raise Unsupported("messages must not be empty")
        return req
