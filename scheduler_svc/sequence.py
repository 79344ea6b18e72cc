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


class Counters:
    """The scheduler's per-sequence counters, one row of a NumPy array each (`state[field, Sequence.row]`): a
    decode step reads every row's counters with one gather, plans, settles and applies them for all rows at once
    and writes them back with one scatter, instead of updating each sequence object. A sequence's counters live
    here from `Scheduler.add` until the scheduler lets it go (finished, no call in flight); before and after, in
    the sequence itself. Either way they read and write as attributes of the sequence (`_Counter`); each field
    is also an attribute here (a view: `counters.num_computed[row]`) and has its index (`Counters.NUM_COMPUTED`).

    Also a copy of the immutable per-sequence values the vectorized steps read (prompt length, token limits, and
    whether the sequence needs the per-token path: stop strings, logprobs, min_tokens; logprobs: 1 + the
    alternatives it asks for, 0 if none)."""

    NAMES = ("num_computed", "inflight_tokens", "inflight_computed", "inflight_calls", "feed_call", "feed_row",
             "slot", "slot_ready")
    STATIC = ("num_prompt", "max_new", "max_length", "per_token", "logprobs")
    FIELDS = (*NAMES, *STATIC)

    def __init__(self, capacity: int = 64):
        self.state = np.zeros((len(self.FIELDS), capacity), np.int64)
        # each sequence's Sampling.row, as 32-bit words (every field is 4 bytes): a call's rows are one take
        self.sampling = np.zeros((capacity, len(ROW_DTYPE.names)), np.uint32)
        self._free = list(range(capacity - 1, -1, -1))
        self._end_sets: dict[frozenset[int], int] = {}  # the sequences' sets of end ids, with how many have each
        self._end_ids: np.ndarray | None = None  # their union

    def end_ids(self) -> np.ndarray:
        """Every id that ends some sequence here (EOS, stop ids): a row none of whose tokens is one cannot end
        on an id."""
        if self._end_ids is None:
            ids = frozenset().union(*self._end_sets)
            self._end_ids = np.fromiter(ids, np.int64, len(ids))
        return self._end_ids

    def adopt(self, seq: "Sequence") -> None:
        assert seq.counters is None, "a sequence belongs to one scheduler"
        if not self._free:
            self._grow()
        values = [getattr(seq, name) for name in self.NAMES]
        seq.row, seq.counters = self._free.pop(), self
        for name, value in zip(self.NAMES, values):
            setattr(seq, name, value)
        sampling, row = seq.sampling, seq.row
        self.num_prompt[row], self.max_new[row], self.max_length[row] = \
            len(seq.prompt_ids), seq.max_new_tokens, seq.max_length
        self.per_token[row] = bool(sampling.stop or sampling.logprobs is not None or sampling.min_tokens)
        self.logprobs[row] = 0 if sampling.logprobs is None else 1 + sampling.logprobs
        self.sampling[row] = np.frombuffer(sampling.row, np.uint32)
        if seq.end_ids not in self._end_sets:
            self._end_ids = None
        self._end_sets[seq.end_ids] = self._end_sets.get(seq.end_ids, 0) + 1

    def drop(self, seq: "Sequence") -> None:
        """The scheduler is done with the sequence: its counters move back into it and its row is free."""
        values = [getattr(seq, name) for name in self.NAMES]
        self._free.append(seq.row)
        if (left := self._end_sets[seq.end_ids] - 1) == 0:
            del self._end_sets[seq.end_ids]
            self._end_ids = None
        else:
            self._end_sets[seq.end_ids] = left
        seq.row, seq.counters = -1, None
        for name, value in zip(self.NAMES, values):
            setattr(seq, name, value)

    def _grow(self) -> None:
        old = self.state.shape[1]
        self.state = np.concatenate([self.state, np.zeros_like(self.state)], axis=1)
        self.sampling = np.concatenate([self.sampling, np.zeros_like(self.sampling)])
        self._free = list(range(2 * old - 1, old - 1, -1))


for _i, _name in enumerate(Counters.FIELDS):
    setattr(Counters, _name.upper(), _i)
    setattr(Counters, _name, property(lambda self, i=_i: self.state[i]))


class _Counter:
    """A sequence attribute kept in its scheduler's Counters while it has one, in the sequence otherwise."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.index = name, Counters.FIELDS.index(name)

    def __get__(self, seq, owner=None):
        if seq is None:
            return self
        counters = seq.counters
        if counters is None:
            return seq.__dict__.get(self.name, 0)
        return int(counters.state[self.index, seq.row])

    def __set__(self, seq, value: int) -> None:
        counters = seq.counters
        if counters is None:
            seq.__dict__[self.name] = value
        else:
            counters.state[self.index, seq.row] = value


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
    blocks: BlockTable = field(default_factory=BlockTable)
    finish: Finish = Finish.NONE
    stop_reason: str = ""
    text: str = ""  # output text so far, stop strings cut; kept only for requests with stop strings
    emitted_chars: int = 0
    # what the stream has not been sent yet (the scheduler streams every few steps: Scheduler.stream_interval):
    # output_ids[sent:], their text (text not yet detokenized: output_ids[detokenized:]) and logprobs
    sent: int = 0
    detokenized: int = 0
    unsent_text: str = ""
    unsent_logprobs: list = field(default_factory=list)
    num_preemptions: int = 0
    cached_prompt_tokens: int = 0  # found in the prefix cache at the admission that produced the first token
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # prompt tokens 1, 2, ...'s logprobs received so far (sampling.prompt_logprobs): kept across a preemption, so
    # a recompute adds only the ones still missing (prefill only: a plain attribute, not one of the Counters)
    prompt_logprobs: list[Logprob] = field(default_factory=list)
    row: int = -1  # this sequence's index in its scheduler's Counters; -1 while it has none
    counters: Counters | None = None

    # The scheduler's counters (in Counters while the sequence is in a scheduler):
    num_computed = _Counter()  # leading tokens whose K/V are in the worker's cache (calls whose result was applied)
    # Calls sent to the worker whose results are not applied yet (pipelining): the scheduler plans the next call
    # from the state the sequence will have after them. Their tokens are not in `tokens` until applied.
    inflight_tokens = _Counter()  # tokens those calls will sample for this sequence
    inflight_computed = _Counter()  # positions past num_computed whose K/V those calls will write
    inflight_calls = _Counter()  # those calls with a row for this sequence: its blocks stay until they return
    feed_call = _Counter()  # the call in flight that samples its newest token (0: none) ...
    feed_row = _Counter()  # ... and the sequence's row in it
    slot = _Counter()  # the worker's sampling slot (penalty counts, logit bias) while running; 0: none
    slot_ready = _Counter()  # a call that fills the slot was sent (and not discarded): 1, else 0

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)  # prompt + output, what the KV cache must hold
        self.num_prompt = len(self.prompt_ids)
        self.max_new_tokens = min(self.sampling.max_tokens, self.max_length - len(self.prompt_ids))
        # ids that end the sequence (once min_tokens are out): its stop ids, and EOS unless ignored
        self.end_ids = self.sampling.stop_token_ids | (frozenset() if self.sampling.ignore_eos else self.eos_ids)

    @property
    def feed(self) -> tuple[int, int] | None:
        """(call index, row) of the call in flight that samples the newest token, None if none does."""
        call = self.feed_call
        return (call, self.feed_row) if call else None

    @feed.setter
    def feed(self, value: tuple[int, int] | None) -> None:
        self.feed_call, self.feed_row = value if value is not None else (0, 0)

    @property
    def output_ids(self) -> list[int]:
        """The sampled tokens (a copy: `tokens` holds them)."""
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def waits_for_leader(self) -> bool:
        """A later sample of a request waits until sample 0 has its first token: its prompt's full blocks are then
        in the prefix cache, and this sample's admission shares them instead of computing them again."""
        lead = self.leader
        return lead is not None and not lead.num_output and lead.status is not Status.FINISHED

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
        return self.max_new_tokens - self.num_output

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
        """Accepts sampled ids up to the first that ends the sequence; returns what to stream now (None if
        nothing): `accept`, then `take_delta`."""
        self.accept(new_ids, logprobs)
        return self.take_delta()


    def accept(self, new_ids: list[int], logprobs: list[Logprob] | None = None) -> None:
        """Accepts sampled ids up to the first that ends the sequence, one at a time, so that a multi-step call's
        tokens after a stop are discarded exactly as if the steps had run one by one; their text and logprobs
        wait for `take_delta`."""
        sampling = self.sampling
        stop_strings = sampling.stop
        done = len(self.tokens) - self.num_prompt
        if not stop_strings and self.detokenized < done:
            self._detokenize()  # ids the scheduler appended without this: their text comes first
        push = self.detokenizer.push_one
        room = self.max_new_tokens - done  # new tokens it may accept
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
        self.tokens += accepted
        self.detokenized = done + count
        self.finish = finish
        if not stop_strings:
            self.unsent_text += pieces[0] if count == 1 else "".join(pieces)
        if logprobs is not None:
            self.unsent_logprobs += logprobs[:count]

    def _detokenize(self) -> None:
        start = self.num_prompt + self.detokenized
        self.unsent_text += self.detokenizer.push_many(self.tokens[start:])
        self.detokenized = len(self.tokens) - self.num_prompt

    def take_delta(self) -> Delta | None:
        """What the stream has not been sent yet, as one Delta (None if nothing): the tokens, their text (a stop
        string's possible start held back) and logprobs, and the finish once finished; the first message with
        tokens also carries the prompt logprobs, if asked (sample 0's: the others' Sampling has none). This runs
        for every stream a step sends to."""
        tokens, sent, num_prompt = self.tokens, self.sent, self.num_prompt
        done = len(tokens) - num_prompt
        if self.sampling.stop:
            end = len(self.text) - self._held_back()
            text = self.text[self.emitted_chars:end] if end > self.emitted_chars else ""
            self.emitted_chars = max(self.emitted_chars, end)
        else:
            text = self.unsent_text
            if self.detokenized < done:  # the common case: the tokens since the last message, not decoded yet
                text += self.detokenizer.push_many(tokens[num_prompt + self.detokenized:])
                self.detokenized = done
            if text:
                self.unsent_text = ""
        if sent == done and not text and not self.finish:
            return None
        self.sent = done
        delta = Delta(tokens[num_prompt + sent:], text, self.finish, self.stop_reason, None, self.index)
        if self.unsent_logprobs:
            delta.logprobs, self.unsent_logprobs = self.unsent_logprobs, []
        if not sent and done and self.sampling.prompt_logprobs is not None:
            delta.prompt_logprobs = self.prompt_logprobs  # once, on the first message with tokens
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

    def abort(self, reason: str = "") -> Delta:
        """Finishes the sequence as aborted; the last Delta carries what was not streamed yet."""
        self.finish, self.stop_reason = Finish.ABORT, reason
        return self.take_delta()
