"""The one request validator of the public API: every field of a GenerateRequest is checked here, and a refusal
(InvalidRequest) names the field; the server answers it with INVALID_ARGUMENT. Nothing else in the scheduler
turns an exception into INVALID_ARGUMENT, so a bug elsewhere is never reported to a client as its own mistake.

Defaults and ranges are vLLM's (SamplingParams), with vLLM's cap of 20 log-probabilities per token (logprobs and
prompt_logprobs)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler_svc.sequence import Sampling
from tinyvllm.v1 import scheduler_pb2

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_N = 64


class InvalidRequest(ValueError):
    """A request the API refuses; the message names the field."""


@dataclass
class ModelLimits:
    """What the validator needs to know of the model and the server."""

    vocab_size: int
    max_length: int  # prompt + output tokens one sequence may hold
    max_logprobs: int = MAX_LOGPROBS


def _finite_in(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise InvalidRequest(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
    return value


def _token_ids(name: str, ids, vocab: int) -> np.ndarray:
    array = np.asarray(list(ids), dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab):
        raise InvalidRequest(f"{name} must be token ids in [0, {vocab})")
    return array


def sampling(p: scheduler_pb2.SamplingParams, limits: ModelLimits) -> Sampling:
    """SamplingParams with vLLM's defaults applied to unset fields; InvalidRequest names a field out of range."""
    s = Sampling()
    if p.HasField("max_tokens"):
        if p.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        s.max_tokens = p.max_tokens
    if p.HasField("temperature"):
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            raise InvalidRequest("temperature must be a finite number >= 0")
        s.temperature = p.temperature
    if p.HasField("top_p"):
        s.top_p = _finite_in("top_p", p.top_p, 0.0, 1.0, lo_open=True)
    if p.HasField("top_k"):
        if p.top_k < -1:
            raise InvalidRequest("top_k must be -1 or 0 (off) or a positive count")
        s.top_k = max(0, p.top_k)
    if p.HasField("seed"):
        s.seed = p.seed  # all 64 bits reach the worker's RNG
    if any(not stop for stop in p.stop):
        raise InvalidRequest("stop strings must not be empty")
    s.stop = tuple(p.stop)
    s.stop_token_ids = frozenset(_token_ids("stop_token_ids", p.stop_token_ids, limits.vocab_size).tolist())
    s.ignore_eos = p.ignore_eos
    s.min_tokens = p.min_tokens
    if s.min_tokens > s.max_tokens:
        raise InvalidRequest("min_tokens must not exceed max_tokens")
    if p.HasField("min_p"):
        s.min_p = _finite_in("min_p", p.min_p, 0.0, 1.0)
    if p.HasField("repetition_penalty"):
        s.repetition_penalty = _finite_in("repetition_penalty", p.repetition_penalty, 0.0, math.inf, lo_open=True)
    if p.HasField("presence_penalty"):
        s.presence_penalty = _finite_in("presence_penalty", p.presence_penalty, -2.0, 2.0)
    if p.HasField("frequency_penalty"):
        s.frequency_penalty = _finite_in("frequency_penalty", p.frequency_penalty, -2.0, 2.0)
    if p.logit_bias:
        ids = _token_ids("logit_bias", p.logit_bias.keys(), limits.vocab_size)
        values = np.asarray([p.logit_bias[int(i)] for i in ids], np.float32)
        if not (np.isfinite(values) & (np.abs(values) <= MAX_LOGIT_BIAS)).all():
            raise InvalidRequest(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        s.logit_bias = (tuple(ids.tolist()), tuple(values.tolist()))
    if p.allowed_token_ids:
        s.allowed_token_ids = tuple(sorted(set(_token_ids("allowed_token_ids", p.allowed_token_ids,
                                                          limits.vocab_size).tolist())))
    if p.HasField("logprobs"):
        if p.logprobs > limits.max_logprobs:
            raise InvalidRequest(f"logprobs must be at most {limits.max_logprobs}, got {p.logprobs}")
        s.logprobs = p.logprobs
    if p.HasField("prompt_logprobs"):
        if p.prompt_logprobs > limits.max_logprobs:
            raise InvalidRequest(f"prompt_logprobs must be at most {limits.max_logprobs}, got {p.prompt_logprobs}")
        s.prompt_logprobs = p.prompt_logprobs
    return s


def num_samples(p: scheduler_pb2.SamplingParams) -> int:
    if p.HasField("n") and not 1 <= p.n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}], got {p.n}")
    return p.n if p.HasField("n") else 1


def prompt_token_ids(ids, limits: ModelLimits) -> list[int]:
    """Already tokenized input: ids in the vocabulary."""
    return _token_ids("prompt_token_ids", ids, limits.vocab_size).tolist()


def prompt_length(ids: list[int], limits: ModelLimits) -> None:
    if not ids:
        raise InvalidRequest("prompt: the prompt is empty")
    if len(ids) >= limits.max_length:
        raise InvalidRequest(f"prompt: {len(ids)} tokens; at most {limits.max_length - 1} fit with one new token")


def priority(request: scheduler_pb2.GenerateRequest) -> int:
    return request.priority if request.HasField("priority") else 0
