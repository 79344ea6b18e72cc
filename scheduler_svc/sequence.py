"""One request's state, owned by the scheduler: tokens, KV progress, block table, stop logic and its stream."""
from __future__ import annotations

import asyncio
import enum
import functools
import time
from dataclasses import dataclass, field

import numpy as np


from scheduler_svc.block_manager import BlockTable
from scheduler_svc.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Finish(enum.IntEnum):
    """Mirrors tinyvllm.v1.FinishReason."""

    NONE = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3


# The per-row sampling columns of a worker call (worker.proto's ExecuteRequest), packed once per sequence: a call
# joins its rows' records instead of reading nine fields of every sequence at every step.
ROW_DTYPE = np.dtype([("temperature", "<f4"), ("top_p", "<f4"), ("top_k", "<i4"), ("seed", "<u4"),
                      ("seed_high", "<u4"), ("min_p", "<f4"), ("repetition_penalty", "<f4"),
                      ("presence_penalty", "<f4"), ("frequency_penalty", "<f4")])


@dataclass
class Sampling:
    """Validated sampling parameters with vLLM's defaults applied. Not changed once a sequence has it."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # 64 bits; the engine draws one when the request gave none
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_tokens: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())  # (ids, values)
    allowed_token_ids: tuple[int, ...] = ()  # empty: all
    logprobs: int | None = None  # top alternatives per new token (0: the chosen token's only); None: off
    prompt_logprobs: int | None = None  # likewise per prompt token after the first (vLLM's prompt_logprobs)

    @functools.cached_property
    def row(self) -> bytes:
        """This sequence's ROW_DTYPE record (a seed not drawn yet counts as 0)."""
        seed = self.seed or 0
        return np.array([(self.temperature, self.top_p, self.top_k, seed & 0xFFFFFFFF, seed >> 32, self.min_p,
                          self.repetition_penalty, self.presence_penalty, self.frequency_penalty)],
                        ROW_DTYPE).tobytes()

    @property
    def needs_slot(self) -> bool:
        """Whether the worker must keep state for the sequence (token counts for the penalties, its bias row, the
        ids min_tokens keeps from being sampled)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias[0] or self.allowed_token_ids
                    or (self.min_tokens and (self.stop_token_ids or not self.ignore_eos)))


_NONE, _STOP, _LENGTH = Finish.NONE, Finish.STOP, Finish.LENGTH  # module globals: quicker than Finish.X


@dataclass
class Logprob:
    """One sampled token's log-probability, rank, and the top alternatives as (id, logprob), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(slots=True)
class Delta:
    """What a stream sends next: new ids, new text, and the finish reason once finished."""

    token_ids: list[int]
    text: str
    finish: Finish = Finish.NONE
    stop_reason: str = ""
    logprobs: list[Logprob] | None = None  # one per token id, when the request asked
    index: int = 0  # the sample of the request (n > 1)
    prompt_logprobs: list[Logprob] | None = None  # with the first token, when the request asked: prompt tokens 1..


@dataclass(eq=False)  # identity semantics: sequences live in sets and lists
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    max_length: int  # prompt + output may not exceed this (context length, KV capacity)
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    priority: int = 0  # lower runs first, then earlier arrival
    index: int = 0  # which of the request's n samples
    leader: Sequence | None = None  # sample 0 of the request, whose prefill the others wait for (shared blocks)
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the worker's cache (calls whose result was applied)
    blocks: BlockTable = field(default_factory=BlockTable)
    finish: Finish = Finish.NONE
    stop_reason: str = ""
    text: str = ""  # output text so far, stop strings cut; kept only for requests with stop strings
    emitted_chars: int = 0
    num_preemptions: int = 0
    cached_prompt_tokens: int = 0  # found in the prefix cache at the admission that produced the first token
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Calls sent to the worker whose results are not applied yet (pipelining): the scheduler plans the next call
    # from the state the sequence will have after them. Their tokens are not in `tokens` until applied.
    inflight_tokens: int = 0  # tokens those calls will sample for this sequence
    inflight_computed: int = 0  # positions past num_computed whose K/V those calls will write
    inflight_calls: int = 0  # those calls with a row for this sequence: its blocks stay until they return
    feed: tuple[int, int] | None = None  # (call index, row) of the call in flight that samples its newest token
    slot: int = 0  # the worker's sampling slot (penalty counts, logit bias) while running; 0: none
    slot_ready: bool = False  # a call that fills the slot was sent (and not discarded)
    # prompt tokens 1, 2, ...'s logprobs received so far (sampling.prompt_logprobs): kept across a preemption, so
    # a recompute adds only the ones still missing
    prompt_logprobs: list[Logprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)  # prompt + output, what the KV cache must hold
        self.max_new_tokens = min(self.sampling.max_tokens, self.max_length - len(self.prompt_ids))
        # ids that end the sequence (once min_tokens are out): its stop ids, and EOS unless ignored
        self.end_ids = self.sampling.stop_token_ids | (frozenset() if self.sampling.ignore_eos else self.eos_ids)

    @property
    def waits_for_leader(self) -> bool:
        """A later sample of a request waits until sample 0 has its first token: its prompt's full blocks are then
        in the prefix cache, and this sample's admission shares them instead of computing them again."""
        lead = self.leader
        return lead is not None and not lead.output_ids and lead.status is not Status.FINISHED

    @property
    def order(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then first come, first served (a request's samples in
        index order, so sample 0 is always ahead of the samples that wait for it)."""
        return (self.priority, self.arrival, self.index)

    # ---- progress ----------------------------------------------------------------------------------------------
    @property
    def planned_len(self) -> int:
        """Tokens the sequence will hold once the calls in flight return (if none of them stops it)."""
        return len(self.tokens) + self.inflight_tokens

    @property
    def planned_computed(self) -> int:
        """Leading tokens whose K/V will be in the cache once the calls in flight return."""
        return self.num_computed + self.inflight_computed

    @property
    def num_pending(self) -> int:
        """Tokens that must still go through the model before the next one can be sampled (after the calls in
        flight)."""
        return self.planned_len - self.planned_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still missing: its prefill chunks need every position's
        logits (and so it cannot take its prompt's blocks from the prefix cache)."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def in_prefill(self) -> bool:
        return self.num_pending > 1

    @property
    def remaining(self) -> int:
        """New tokens the sequence may still accept (applied results only: what stop logic uses)."""
        return self.max_new_tokens - len(self.output_ids)

    @property
    def remaining_to_schedule(self) -> int:
        """New tokens no call in flight will sample yet: what the next call may plan for."""
        return self.remaining - self.inflight_tokens

    def reset_for_recompute(self) -> None:
        """Preempted or worker lost: KV is gone, the tokens stay; they are prefilled again later."""
        self.num_computed = 0
        self.status = Status.WAITING
        self.num_preemptions += 1

    # ---- new tokens ---------------------------------------------------------------------------------------------
    def append(self, new_ids: list[int], logprobs: list[Logprob] | None = None) -> Delta | None:
        """Accepts sampled ids up to the first that ends the sequence; returns what to stream (None if nothing).

        Ids are taken one at a time so that a multi-step call's tokens after a stop are discarded, exactly as if
        the steps had run one by one. This runs for every running sequence at every step: local variables and
        module-level enum members, and the output text is kept only where stop strings need it."""
        sampling, push = self.sampling, self.detokenizer.push_one
        done = len(self.output_ids)
        room = self.max_new_tokens - done  # new tokens it may accept
        stop_strings = sampling.stop
        count, finish, pieces = 0, _NONE, []
        for tok in new_ids:
            count += 1
            if tok in self.end_ids and done + count >= sampling.min_tokens:
                finish = _STOP
                if tok in sampling.stop_token_ids:
                    self.stop_reason = str(tok)
            elif count >= room:
                finish = _LENGTH
            piece = push(tok, finish is not _NONE)
            if stop_strings and piece:
                self.text += piece
                if self._cut_at_stop_string(len(piece)):
                    finish = _STOP
            else:
                pieces.append(piece)
            if finish is not _NONE:
                break
        accepted = new_ids if count == len(new_ids) else new_ids[:count]
        self.output_ids += accepted
        self.tokens += accepted
        self.finish = finish
        if stop_strings:
            delta = self._take_delta(accepted)
        else:  # nothing held back: every new piece is streamed now
            delta = Delta(accepted, pieces[0] if count == 1 else "".join(pieces), finish, self.stop_reason,
                          index=self.index)
        if delta is not None and logprobs is not None:
            delta.logprobs = logprobs[:count]
        return delta

    def _cut_at_stop_string(self, delta_len: int) -> bool:
        longest = max(map(len, self.sampling.stop))
        start = max(0, len(self.text) - delta_len - longest + 1)
        hits = [(i, s) for s in self.sampling.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text, self.stop_reason = self.text[:index], stop
        return True

    def _held_back(self) -> int:
        """Characters at the end that could be the start of a stop string: not streamed until resolved."""
        if self.finish or not self.sampling.stop:
            return 0
        tail = self.text[self.emitted_chars:]
        for n in range(min(len(tail), max(map(len, self.sampling.stop)) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.sampling.stop):
                return n
        return 0

    def _take_delta(self, accepted: list[int]) -> Delta | None:
        end = len(self.text) - self._held_back()
        text = self.text[self.emitted_chars:end] if end > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, end)
        if not accepted and not text and not self.finish:
            return None
        return Delta(token_ids=accepted, text=text, finish=self.finish, stop_reason=self.stop_reason,
                     index=self.index)

    def abort(self, reason: str = "") -> Delta:
        self.finish, self.stop_reason = Finish.ABORT, reason
        return Delta(token_ids=[], text="", finish=Finish.ABORT, stop_reason=reason, index=self.index)
