"""Continuous batching policy: what runs next, padded to a bucket the worker has a graph for, and what its result
does to every sequence (nano-vllm style: `schedule`, the engine runs it, `postprocess`).

Each call to `schedule` returns one batch: prefill chunks when any sequence needs one (new requests get their
first token quickly), otherwise one decode batch of every running sequence, a few steps long. Finished
sequences leave at once; new ones join at the next call. When decode needs blocks that are not there, the
youngest running sequence is preempted: its blocks are released and it is recomputed later.

Calls are pipelined: up to `max_inflight` calls are sent before their results come back, so the worker starts
the next call the moment one ends instead of waiting for the scheduler's host work and a gRPC round trip. A
call is planned from the state the sequences will have after the calls in flight (`Sequence.planned_len`,
`planned_computed`); a row whose newest token is still being sampled by the previous call names that call's row
(`prev_rows`), and the worker feeds the token forward on the device. Tokens sampled past a stop (EOS, stop
string), which the plan could not foresee, are discarded, as with the steps of a multi-step call; a finished
or aborted sequence keeps its blocks until no call in flight uses them, and the prefix cache learns only of
K/V whose call has returned. A preemption never takes a sequence that a call in flight still uses.
"""
from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

import numpy as np

from scheduler_svc.block_manager import BlockManager, NoFreeBlocks
from scheduler_svc.sequence import Counters, Delta, Logprob, Sequence, Status

log = logging.getLogger(__name__)

# Calls sent to the worker and not yet answered: one running, one queued behind it, so the worker never waits.
PIPELINE_DEPTH = 2
# Decode steps per call. Pipelining hides the scheduler's host work and the gRPC round trip, so calls can be
# short, and short calls bound two latencies: a request that arrives waits for the call running and the one queued
# behind it (at most twice this many steps) before its prefill runs, and a stream receives its tokens once per
# call. What a short call still costs is the worker's own per-call work (request decoding, copies, read-back).
STREAM_STEPS = 2
# ... and while requests are arriving (one arrived within the last ARRIVING_CALLS calls), one step per call, so
# that the next arrivals of a burst join within about two steps. Requests that wait for rows or blocks do not
# shorten calls: they join when a sequence finishes, and one-step calls under saturation would only add overhead.
JOIN_STEPS = 1
ARRIVING_CALLS = 4
# Streaming: a stream gets its new tokens every `stream_interval` tokens (vLLM's --stream-interval), its first and
# its last at once. Each message costs the scheduler process about 100 us of CPU on the 2-core CI machine (most of
# it in grpc.aio), so the default (0) chooses by load: every token while up to STREAM_ROWS sequences run, then
# every ceil(running / STREAM_ROWS) tokens (about STREAM_ROWS messages per step), never fewer than one message
# every MAX_STREAM_INTERVAL tokens (issue 7: clients receive tokens at least every 4 steps). The sequences'
# messages are staggered (each counts from its own phase), so each step sends about the same number. Calls of
# STREAM_STEPS steps, the engine's once a batch is stable, send every 2 tokens anyway: up to 64 running, the
# default changes only the calls of one step made while requests arrive.
STREAM_ROWS = 32
MAX_STREAM_INTERVAL = 4

_ROW, _TOKENS, _BLOCK_IDS = attrgetter("row"), attrgetter("tokens"), attrgetter("blocks.block_ids")
_LAST = itemgetter(-1)
# the rows of Counters.state
_COMPUTED, _INFLIGHT_TOKENS, _INFLIGHT_COMPUTED, _INFLIGHT_CALLS = (
    Counters.NUM_COMPUTED, Counters.INFLIGHT_TOKENS, Counters.INFLIGHT_COMPUTED, Counters.INFLIGHT_CALLS)
_FEED_CALL, _FEED_ROW, _SLOT, _SLOT_READY = Counters.FEED_CALL, Counters.FEED_ROW, Counters.SLOT, Counters.SLOT_READY
_PROMPT, _MAX_NEW, _MAX_LENGTH, _PER_TOKEN, _LOGPROBS = (
    Counters.NUM_PROMPT, Counters.MAX_NEW, Counters.MAX_LENGTH, Counters.PER_TOKEN, Counters.LOGPROBS)
_MUTABLE = len(Counters.NAMES)  # state[:_MUTABLE]: what the scheduler changes


@dataclass
class ScheduledBatch:
    """One worker call: the sequences in it, padded to a bucket, and the inputs of each row as planned."""

    seqs: list[Sequence]
    rows: int  # bucket rows, >= len(seqs)
    tokens: int  # bucket tokens per row (1 for decode)
    chunk_lens: list[int]  # valid tokens per sequence
    num_steps: int = 1
    # filled by the scheduler when the call is planned (`Scheduler._launch`), one entry per sequence
    positions: list[int] = field(default_factory=list)  # position of the row's first token
    # the row's input tokens: a list per row for prefill, one token per row for decode (0 for a fed row)
    inputs: list[list[int]] | list[int] = field(default_factory=list)
    prev_rows: list[int] = field(default_factory=list)  # row of previous_call whose last token is the input, or -1
    counters: list[int] = field(default_factory=list)  # tokens the sequence has sampled before this call
    new_tokens: list[int] = field(default_factory=list)  # tokens the row samples that the sequence keeps
    call_index: int = 0  # numbers the scheduler's calls, 1, 2, ...
    previous_call: int = 0  # the call in flight this one follows, 0 if none
    slots: list[int] = field(default_factory=list)  # the row's sampling slot, 0 if none or its sample is dropped
    slot_inits: list[Sequence] = field(default_factory=list)  # sequences whose slot this call fills first
    logprobs: bool = False  # some row wants its tokens' logprobs
    prompt_logprobs: bool = False  # a prefill row wants its chunk's prompt logprobs (it runs alone)
    # the call's sequences as rows of the scheduler's Counters, their sampling records (Sampling.row, as rows of
    # 32-bit words), and for a decode call their token counts and counters (Counters.state[:, row_ids]) when it
    # was planned
    row_ids: np.ndarray | None = None
    sampling: np.ndarray | None = None
    num_tokens: np.ndarray | None = None
    state: np.ndarray | None = None
    # a decode call's block tables (each sequence's BlockTable.block_ids, the arrays themselves) and their lengths
    block_lists: list | None = None
    num_blocks: np.ndarray | None = None

    @property
    def is_prefill(self) -> bool:
        return self.tokens > 1

    def written(self, i: int) -> int:
        """Positions whose K/V row i writes: its chunk, or one per decode step."""
        return self.chunk_lens[i] if self.is_prefill else self.num_steps


class Scheduler:
    def __init__(self, blocks: BlockManager, decode_batch_sizes: list[int], prefill_shapes: list[tuple[int, int]],
                 max_steps: int, max_inflight: int = PIPELINE_DEPTH, stream_steps: int = STREAM_STEPS,
                 join_steps: int = JOIN_STEPS, call_base: int = 0, num_slots: int | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 stream_interval: int = 0):
        self.blocks = blocks
        # tokens per stream message, 0: by load (STREAM_ROWS); at most MAX_STREAM_INTERVAL
        self.stream_interval = min(stream_interval, MAX_STREAM_INTERVAL)
        self.counters = Counters()  # the per-sequence counters every step updates, as arrays
        self.decode_batch_sizes = sorted(decode_batch_sizes)
        # per-call budgets (vLLM's flags): sequences running at once, and tokens one call may compute
        self.max_running = min(max_num_seqs or self.decode_batch_sizes[-1], self.decode_batch_sizes[-1])
        # a 1-token chunk is a decode bucket of the same rows
        self.prefill_shapes = sorted({*prefill_shapes, *((b, 1) for b in self.decode_batch_sizes)},
                                     key=lambda s: (s[1], s[0]))
        self.max_batched_tokens = max_num_batched_tokens or max(b * t for b, t in self.prefill_shapes)
        # the worker's sampling slots 1 .. num_slots - 1 (penalty counts, logit bias), one per running sequence
        # that needs one
        self.free_slots = list(range(1, (self.max_running + 1 if num_slots is None else num_slots)))
        self.max_steps = max_steps  # the worker's bound on steps per call
        self.stream_steps = min(stream_steps, max_steps)
        self.join_steps = min(join_steps, max_steps)
        self._calls_since_arrival = ARRIVING_CALLS
        self.max_inflight = max_inflight
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inflight: deque[ScheduledBatch] = deque()  # calls planned and not yet settled, oldest first
        self.num_calls = 0
        # some running sequence may be in prefill: set by whatever can put one there (admission, a prefill call
        # planned, applied or discarded, any discarded call), cleared by a scan that finds none, so that steady
        # decode does not look for prefill work in every sequence at every step
        self._maybe_prefill = False
        # running sequences chosen for preemption by a waiting one of higher priority while a call in flight still
        # used them: no new call includes them; recomputed at each admission pass
        self._draining: set[Sequence] = set()
        self.call_base = call_base  # call indices are call_base + 1, + 2, ...: distinct per scheduler session
        self.num_preemptions = 0
        self._finished_inflight: set[Sequence] = set()  # finished while a call in flight had a row for them
        # the running list as a call's own (never changed) list, and its Counters rows; None after any change
        self._snapshot: tuple[list[Sequence], np.ndarray] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.counters.adopt(seq)
        self._enqueue(seq)
        self._calls_since_arrival = 0

    def _enqueue(self, seq: Sequence) -> None:
        """Into the waiting queue in scheduling order (priority, then arrival)."""
        if not self.waiting or self.waiting[-1].order <= seq.order:
            self.waiting.append(seq)
        else:
            self.waiting.insert(bisect.bisect_right([s.order for s in self.waiting], seq.order), seq)

    def _release(self, seq: Sequence) -> None:
        """Returns what a sequence holds that no call in flight uses any more: its blocks and its slot."""
        self.blocks.release(seq.blocks)
        if seq.slot:
            self.free_slots.append(seq.slot)
            seq.slot, seq.slot_ready = 0, False

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out (finished or aborted); its blocks are returned now, or when the last call in
        flight that uses them returns (`_let_go`): until then the worker may still write them."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
            self._snapshot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if seq.inflight_calls:
            self._finished_inflight.add(seq)
        else:
            self._let_go(seq)

    def _let_go(self, seq: Sequence) -> None:
        """A finished sequence that no call in flight uses: its blocks, slot and counters' row are given back."""
        self._release(seq)
        self._finished_inflight.discard(seq)
        self.counters.drop(seq)

    # ---- policy -------------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """The next call, planned after the calls in flight and counted as in flight itself (the caller sends it,
        then hands its result to `postprocess`, or to `discard` if none comes); None when nothing can run now.
        A pass that only freed blocks (by preempting) is followed by another, so the caller never waits for a
        wake-up while runnable work exists."""
        if len(self.inflight) >= self.max_inflight:
            return None
        for _ in range(len(self.running) + len(self.waiting) + 1):
            self._admit()
            prefill = None
            if self._maybe_prefill and self.running:
                running = self.running
                prefill = [running[i] for i in np.flatnonzero(self._pending(running) > 1).tolist()]
            self._maybe_prefill = bool(prefill)
            if prefill and self._draining:
                prefill = [s for s in prefill if s not in self._draining]
            batch = self._prefill_batch(prefill) if prefill else None
            if batch is None:
                batch = self._decode_batch()
            if batch is not None:
                self._launch(batch)
                return batch
            if not self.running:
                return None
        return None

    def _pending(self, seqs: list[Sequence]) -> np.ndarray:
        """Tokens pending (Sequence.num_pending) of each of `seqs`, as an array: this runs over every running
        sequence at every step that may hold prefill work."""
        _, num_tokens, state = self._rows(seqs)
        return num_tokens + state[_INFLIGHT_TOKENS] - state[_COMPUTED] - state[_INFLIGHT_COMPUTED]

    def _call_steps(self) -> int:
        """Steps of the next decode call: join_steps while requests are arriving or an admitted one still waits
        for its prefill, stream_steps once the batch is stable."""
        arriving = self._calls_since_arrival < ARRIVING_CALLS or self._maybe_prefill
        return max(1, self.join_steps if arriving else self.stream_steps)

    def _admit(self) -> None:
        """Moves waiting sequences to running while a row, a slot if it needs one, and blocks for their first
        chunk are free. When the head of the queue lacks one of them, a running sequence of lower priority (a
        higher value) gives its own back: preempted, as vLLM's priority scheduling does on arrival."""
        self._draining.clear()
        if not self.waiting:
            return
        reserved = self._blocks_reserved()  # free blocks that admitted sequences' next chunks will take
        while self.waiting:
            seq = self.waiting[0]
            if seq.waits_for_leader:
                break  # its leader's first token is a call or two away
            if len(self.running) >= self.max_running:
                if self._preempt_for(seq, lambda s: True):
                    continue
                break
            if seq.sampling.needs_slot and not seq.slot and not self.free_slots:
                # every slot is taken by a running sequence: it joins when one leaves
                if self._preempt_for(seq, lambda s: s.slot):
                    continue
                break
            if not seq.blocks.block_ids:
                self.blocks.allocate_prompt(seq.blocks, seq.tokens, lookup=not seq.wants_prompt_logprobs)
                seq.num_computed = seq.blocks.num_cached_tokens
                if not seq.num_output:  # reported for the admission that produces the first token
                    seq.cached_prompt_tokens = seq.num_computed
            first_chunk = min(seq.num_pending, self.prefill_shapes[-1][1], self.max_batched_tokens)
            needed = self.blocks.blocks_for(seq.num_computed + first_chunk) - len(seq.blocks.block_ids)
            if needed > self.blocks.num_free - reserved:
                # nothing running: take back what other waiting sequences hold; else what a running sequence of
                # lower priority holds
                if ((not self.running and self._release_waiting(keep=seq))
                        or self._preempt_for(seq, lambda s: s.blocks.block_ids)):
                    continue
                if reserved:  # its prefix-cache references would starve sequences admitted before it
                    self._release_waiting()
                break
            reserved += max(0, needed)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self._maybe_prefill = True
            if seq.sampling.needs_slot and not seq.slot:
                seq.slot, seq.slot_ready = self.free_slots.pop(), False
            self.running.append(seq)
            self._snapshot = None

    def _blocks_reserved(self) -> int:
        """Blocks that running sequences still in prefill need for their next chunk: admitted, not grown yet."""
        if not self._maybe_prefill:
            return 0
        chunk = min(self.prefill_shapes[-1][1], self.max_batched_tokens)
        return sum(max(0, self.blocks.blocks_for(s.planned_computed + min(s.num_pending, chunk))
                       - len(s.blocks.block_ids)) for s in self.running if s.in_prefill)

    def _preempt_for(self, seq: Sequence, helps) -> bool:
        """Preempts the running sequence of lowest priority below `seq`'s (the highest value, then the latest
        arrival) among those whose resources would help (`helps`); True if it did. One that a call in flight
        still uses cannot give its blocks back yet: it is left out of new calls (`_draining`) and preempted
        by a later pass, once its calls have returned. Equal priorities never preempt each other."""
        victims = [s for s in self.running if s.priority > seq.priority and helps(s)]
        if not victims:
            return False
        victim = max(victims, key=lambda s: s.order)
        if victim.inflight_calls:
            self._draining.add(victim)
            return False
        self._preempt(victim)
        return True

    def _prefill_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        # a sequence that still needs prompt logprobs runs alone when its turn comes: its graph computes the logits
        # of every position, so one row bounds that memory, and the graphs to one per chunk length
        if seqs[0].wants_prompt_logprobs:
            seqs = seqs[:1]
        elif any(s.wants_prompt_logprobs for s in seqs):
            seqs = [s for s in seqs if not s.wants_prompt_logprobs]
        longest = max(s.num_pending for s in seqs)
        max_rows_any = max(b for b, _ in self.prefill_shapes)
        # smallest chunk length that covers the longest prompt (or the largest there is), then enough rows
        t_options = sorted({t for _, t in self.prefill_shapes if t > 1})
        tokens = next((t for t in t_options if t >= longest), t_options[-1])
        row_options = sorted(b for b, t in self.prefill_shapes if t == tokens)
        n = min(len(seqs), max_rows_any, row_options[-1])
        rows = next(b for b in row_options if b >= n)
        chosen, lens = [], []
        budget = self.max_batched_tokens
        for seq in seqs[:n]:
            chunk = min(seq.num_pending, tokens, budget)
            if chunk == tokens < seq.num_pending and seq.wants_prompt_logprobs:
                chunk -= 1  # the token after the chunk goes in its padding: its last position's prompt logprob
            if chunk <= 0:
                break
            try:
                self.blocks.grow(seq.blocks, seq.planned_computed + chunk)
            except NoFreeBlocks:
                continue
            chosen.append(seq)
            lens.append(chunk)
            budget -= chunk
        if not chosen:
            self._preempt_youngest()
            return None
        return ScheduledBatch(chosen, rows, tokens, lens)

    def _decode_batch(self) -> ScheduledBatch | None:
        """One decode call of every running sequence with exactly its newest token pending and tokens left to plan
        for, each given blocks for the call's steps. Vectorized over the sequences; when blocks run out, the
        sequential `_grow_in_order` decides who is preempted."""
        if self._snapshot is None:  # (a call's own list: the running list changes while it is in flight)
            self._snapshot = (list(self.running), np.fromiter(map(_ROW, self.running), np.int64, len(self.running)))
        seqs, rows = self._snapshot
        if self._draining:
            seqs = [s for s in seqs if s not in self._draining]  # to be preempted once their calls return
            rows = None
        if not seqs:
            return None
        rows, num_tokens, state = self._rows(seqs, rows)
        planned = num_tokens + state[_INFLIGHT_TOKENS]  # Sequence.planned_len
        left = state[_MAX_NEW] + state[_PROMPT] - planned  # tokens no call plans for yet
        chosen = left > 0
        if self._maybe_prefill:  # else every running sequence has exactly its newest token pending
            chosen &= planned - state[_COMPUTED] - state[_INFLIGHT_COMPUTED] == 1
        if not chosen.all():
            index = np.flatnonzero(chosen)[:self.max_batched_tokens]
            if not index.size:
                return None
            seqs = [seqs[i] for i in index.tolist()]
            rows, num_tokens, state, planned, left = (
                rows[index], num_tokens[index], state[:, index], planned[index], left[index])
        elif len(seqs) > self.max_batched_tokens:
            cut = self.max_batched_tokens
            seqs, rows, num_tokens, state, planned, left = (
                seqs[:cut], rows[:cut], num_tokens[:cut], state[:, :cut], planned[:cut], left[:cut])
        # run as many steps as the longest-lived row can use; rows that finish early discard the rest
        steps = max(1, min(self._call_steps(), int(left.max())))
        # positions written: planned_len - 1 ... planned_len + steps - 2, within the sequence's limit
        need = np.minimum(planned + (steps - 1), state[_MAX_LENGTH])
        block_lists = list(map(_BLOCK_IDS, seqs))
        num_blocks = np.fromiter(map(len, block_lists), np.int64, len(seqs))
        short = -(-need // self.blocks.block_size) - num_blocks
        grow = np.flatnonzero(short > 0)
        if grow.size:  # rows entering a new block (one in block_size per step)
            if int(short[grow].sum()) <= self.blocks.num_free:
                self.blocks.grow_all([seqs[i].blocks for i in grow.tolist()], need[grow].tolist())
                num_blocks[grow] += short[grow]
            else:  # not enough for all: oldest first, preempting the youngest
                ready = self._grow_in_order(seqs, need.tolist())
                if not ready:
                    return None
                if len(ready) < len(seqs):
                    seqs = ready
                    rows, num_tokens, state = self._rows(seqs)
                block_lists = num_blocks = None
        batch = ScheduledBatch(seqs, next(b for b in self.decode_batch_sizes if b >= len(seqs)), 1, [1] * len(seqs),
                               num_steps=steps)
        batch.row_ids, batch.num_tokens, batch.state = rows, num_tokens, state
        batch.block_lists, batch.num_blocks = block_lists, num_blocks
        return batch

    def _rows(self, seqs: list[Sequence], rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """The sequences' Counters rows, token counts and counters (Counters.state[:, rows])."""
        n = len(seqs)
        if rows is None:
            rows = np.fromiter(map(_ROW, seqs), np.int64, n)
        return rows, np.fromiter(map(len, map(_TOKENS, seqs)), np.int64, n), self.counters.state[:, rows]

    def _grow_in_order(self, seqs: list[Sequence], need: list[int]) -> list[Sequence]:
        """Oldest first, every sequence gets blocks for `need` positions. When blocks run out, the youngest
        sequence not yet given them (and in no call in flight) is preempted, or, if there is none, the sequence
        itself: a sequence already given its blocks is never preempted (it would run with no blocks). A sequence
        that a call in flight still uses is left out of this call instead (its blocks are being written); once
        that call returns it can be preempted like any other. Returns the sequences that have their blocks."""
        ready: list[Sequence] = []
        for seq, n in zip(seqs, need):
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an older one
            placed = True
            while not self.blocks.can_grow(seq.blocks, n):
                if not self._preempt_youngest(spare=[*ready, seq]):
                    if seq.inflight_calls:
                        placed = False
                    else:
                        self._preempt(seq)
                    break
            if seq.status is not Status.RUNNING or not placed:
                continue
            self.blocks.grow(seq.blocks, n)
            ready.append(seq)
        return ready

    def _preempt_youngest(self, spare: list[Sequence] = ()) -> bool:
        """Frees blocks: first the prefix-cache references a waiting sequence holds, then the blocks of the running
        sequence not in `spare` that comes last in scheduling order (the highest priority value, then the latest
        arrival). False if there was nothing to free."""
        if self._release_waiting():
            return True
        victims = [s for s in self.running if s not in spare and not s.inflight_calls]
        if not victims:
            return False
        self._preempt(max(victims, key=lambda s: s.order))
        return True

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self._snapshot = None
        self._requeue(victim)
        self.num_preemptions += 1
        log.info("preempted %s (%d tokens) to free KV blocks", victim.request_id, len(victim.tokens))

    def _release_waiting(self, keep: Sequence | None = None) -> bool:
        """Drops the prefix-cache references held by waiting sequences (not `keep`); False if none held any."""
        holding = [s for s in self.waiting if s.blocks.block_ids and s is not keep]
        for seq in holding:
            self.blocks.release(seq.blocks)
            seq.num_computed = 0
        return bool(holding)

    def preempt_all(self) -> None:
        """The worker lost its KV contents: every sequence is recomputed from its tokens, holding no blocks.
        Calls in flight must have been settled (`discard`) first."""
        assert not self.inflight, "preempt_all with calls in flight"
        self._release_waiting()  # a waiting head may hold prefix-cache references
        for seq in reversed(self.running):
            self._requeue(seq)
        self.running.clear()
        self._snapshot = None

    def _requeue(self, seq: Sequence) -> None:
        """Back to the queue (ahead of later arrivals of its priority) holding no blocks nor slot; its tokens are
        prefilled again when admitted."""
        self._release(seq)
        seq.reset_for_recompute()
        self._enqueue(seq)

    # ---- calls in flight ---------------------------------------------------------------------------------------
    def _launch(self, batch: ScheduledBatch) -> None:
        """Plans each row's inputs from the state after the calls in flight, then counts the call in flight."""
        self.num_calls += 1
        self._calls_since_arrival += 1
        batch.call_index = index = self.call_base + self.num_calls
        previous = self.inflight[-1] if self.inflight else None
        batch.previous_call = previous.call_index if previous else 0
        if batch.row_ids is None:
            batch.row_ids = np.fromiter(map(_ROW, batch.seqs), np.int64, len(batch.seqs))
        batch.sampling = self.counters.sampling[batch.row_ids]
        if batch.is_prefill:
            self._maybe_prefill = True
            for seq in batch.seqs:
                if seq.slot and not seq.slot_ready:
                    batch.slot_inits.append(seq)
                    seq.slot_ready = True
            batch.logprobs = any(seq.sampling.logprobs is not None for seq in batch.seqs)
            batch.prompt_logprobs = any(seq.wants_prompt_logprobs for seq in batch.seqs)
            self._plan_prefill(batch, previous)
        else:
            state = batch.state
            slots = state[_SLOT]
            if slots.any():
                first = np.flatnonzero((slots > 0) & (state[_SLOT_READY] == 0))
                batch.slot_inits = [batch.seqs[i] for i in first.tolist()]
                state[_SLOT_READY, first] = 1
            batch.slots = slots.copy()
            batch.logprobs = bool(state[_LOGPROBS].any())
            self._plan_decode(batch, previous)
        self.inflight.append(batch)

    @staticmethod
    def _plan_prefill(batch: ScheduledBatch, previous: ScheduledBatch | None) -> None:
        for i, (seq, length) in enumerate(zip(batch.seqs, batch.chunk_lens)):
            start = seq.planned_computed
            batch.positions.append(start)
            batch.counters.append(seq.num_output + seq.inflight_tokens)
            # a prompt-logprobs row's input also holds the token after its chunk, if any (worker.proto)
            lookahead = int(length < batch.tokens and seq.wants_prompt_logprobs)
            batch.inputs.append(seq.tokens[start:start + length + lookahead])
            batch.prev_rows.append(-1)
            samples = int(start + length == seq.planned_len)
            batch.new_tokens.append(samples)
            batch.slots.append(seq.slot if samples else 0)
            seq.inflight_tokens += samples
            seq.inflight_computed += length
            seq.inflight_calls += 1
            if samples:
                seq.feed = (batch.call_index, i)

    def _plan_decode(self, batch: ScheduledBatch, previous: ScheduledBatch | None) -> None:
        """One token per row, num_steps samples: the hot path of a stable batch, so whole arrays at once (the
        rows' counters as gathered by `_decode_batch`, written back at the end)."""
        state, steps, n = batch.state, batch.num_steps, len(batch.seqs)
        inflight = state[_INFLIGHT_TOKENS].copy()
        batch.positions = state[_COMPUTED] + state[_INFLIGHT_COMPUTED]  # planned_computed: the newest token's
        batch.counters = batch.num_tokens - state[_PROMPT] + inflight
        # a row whose newest token is being sampled by the previous call: the worker feeds it forward
        fed = inflight > 0
        inputs = np.zeros(n, np.int64)
        if fed.any():
            assert previous is not None and (state[_FEED_CALL, fed] == previous.call_index).all(), \
                "fed from a call not in flight"
            batch.prev_rows = np.where(fed, state[_FEED_ROW], -1)
            if not fed.all():
                own = np.flatnonzero(~fed)
                inputs[own] = list(map(_LAST, map(_TOKENS, map(batch.seqs.__getitem__, own.tolist()))))
        else:  # each row's input is its newest token (tokens[positions])
            batch.prev_rows = np.full(n, -1, np.int64)
            inputs[:] = list(map(_LAST, map(_TOKENS, batch.seqs)))
        batch.inputs = inputs
        state[_INFLIGHT_TOKENS] += steps
        state[_INFLIGHT_COMPUTED] += steps
        state[_INFLIGHT_CALLS] += 1
        state[_FEED_CALL] = batch.call_index
        state[_FEED_ROW] = np.arange(n)
        self.counters.state[:_MUTABLE, batch.row_ids] = state[:_MUTABLE]
        batch.new_tokens = [steps] * n

    def _settle_row(self, batch: ScheduledBatch, i: int) -> Sequence:
        """Row i's call is over (applied or discarded): it no longer counts in the plan; a finished sequence
        whose last call this was returns its blocks."""
        seq = batch.seqs[i]
        seq.inflight_tokens -= batch.new_tokens[i]
        seq.inflight_computed -= batch.written(i)
        seq.inflight_calls -= 1
        if seq.feed_call == batch.call_index:
            seq.feed_call = 0
        if seq.status is Status.FINISHED and not seq.inflight_calls:
            self._let_go(seq)
        return seq

    def postprocess(self, batch: ScheduledBatch, sampled: np.ndarray, logprobs: np.ndarray | None = None,
                    prompt_logprobs: np.ndarray | None = None) -> list[tuple[Sequence, Delta]]:
        """Applies the oldest call's sampled tokens, (rows, num_steps), and their logprobs (rows, num_steps,
        2 + 2 k) and prompt logprobs (rows, tokens, 2 + 2 k) if the call asked; returns what to stream to whom now
        (`stream_interval`). Sequences that finish leave the scheduler (their blocks once no call in flight uses
        them)."""
        assert self.inflight and self.inflight[0] is batch, "results must be applied in the order of the calls"
        self.inflight.popleft()
        sorted_logprobs = None
        if logprobs is not None:  # Counters.logprobs is 1 + the alternatives asked for
            asked = self.counters.state[_LOGPROBS, batch.row_ids] if batch.row_ids is not None else [21]
            sorted_logprobs = _SortedLogprobs(logprobs, max(1, int(np.max(asked)) - 1))
        if batch.is_prefill:
            return self._postprocess_prefill(batch, sampled, sorted_logprobs, prompt_logprobs)
        return self._postprocess_decode(batch, sampled, sorted_logprobs)

    def _interval(self) -> int:
        return self.stream_interval or min(MAX_STREAM_INTERVAL, -(-len(self.running) // STREAM_ROWS) or 1)

    def _postprocess_prefill(self, batch: ScheduledBatch, sampled: np.ndarray, sorted_logprobs: _SortedLogprobs | None,
                             prompt_logprobs: np.ndarray | None) -> list[tuple[Sequence, Delta]]:
        """A prefill call: its chunks' prompt logprobs are kept (`_add_prompt_logprobs`); a sequence whose last
        chunk it was gets its first token (streamed at once, with the prompt logprobs: `Sequence.take_delta`)."""
        self._maybe_prefill = True
        out: list[tuple[Sequence, Delta]] = []
        rows = sampled.tolist()
        for i, seq in enumerate(batch.seqs):
            self._settle_row(batch, i)
            if seq.status is Status.FINISHED:  # finished or aborted while the call ran: results discarded
                continue
            if prompt_logprobs is not None and seq.wants_prompt_logprobs:
                _add_prompt_logprobs(seq, batch.positions[i], prompt_logprobs[i, :batch.chunk_lens[i]])
            computed = seq.num_computed + batch.chunk_lens[i]
            if batch.new_tokens[i]:
                new = rows[i][:1]
                wanted = seq.sampling.logprobs
                seq.accept(new, None if wanted is None or sorted_logprobs is None
                           else sorted_logprobs.row(i, new, wanted))
                computed = len(seq.tokens) - 1  # every token but the newest has its K/V written
            seq.num_computed = computed
            self._register_blocks(seq, computed)
            if batch.new_tokens[i] and (delta := seq.take_delta()) is not None:
                out.append((seq, delta))
                if seq.finish:
                    self.remove(seq)
        return out

    def _register_blocks(self, seq: Sequence, num_computed: int) -> None:
        """Only K/V of calls that returned: a block is published once all its tokens were really written."""
        if num_computed // self.blocks.block_size > seq.blocks.num_hashed_blocks:
            self.blocks.register_full_blocks(seq.blocks, seq.tokens, num_computed)

    def _postprocess_decode(self, batch: ScheduledBatch, sampled: np.ndarray,
                            sorted_logprobs: _SortedLogprobs | None) -> list[tuple[Sequence, Delta]]:
        """A decode call, every row at once where the counters allow: rows whose tokens cannot end them (no end
        id among them, within their length, no stop strings, logprobs or min_tokens) take them with no per-token
        work (their text is decoded when they are streamed); the others token by token (`Sequence.accept`)."""
        c, rows, steps, seqs = self.counters, batch.row_ids, batch.num_steps, batch.seqs
        n = len(seqs)
        # the call is over: it no longer counts in the plan
        state = c.state[:, rows]
        state[_INFLIGHT_TOKENS] -= steps
        state[_INFLIGHT_COMPUTED] -= steps
        state[_INFLIGHT_CALLS] -= 1
        feed = state[_FEED_CALL]
        feed[feed == batch.call_index] = 0
        c.state[:_MUTABLE, rows] = state[:_MUTABLE]
        live = np.ones(n, bool)
        if self._finished_inflight:  # finished or aborted while the call ran: results discarded
            for i, seq in enumerate(seqs):
                if seq.status is Status.FINISHED:
                    live[i] = False
                    if not seq.inflight_calls:
                        self._let_go(seq)
        sampled = sampled[:n]
        num_tokens = np.fromiter(map(len, map(_TOKENS, seqs)), np.int64, n)
        done_before = num_tokens - state[_PROMPT]
        careful = ((state[_PER_TOKEN] > 0) | (done_before + steps >= state[_MAX_NEW])
                   | (sampled[:, :, None] == c.end_ids()).any(axis=(1, 2)))
        new_rows = sampled.tolist()
        num_tokens += steps  # rows taking all their tokens; careful ones are counted below
        careful &= live
        if careful.any() or not live.all():
            quick = np.flatnonzero(live & ~careful).tolist()
            new_quick = [new_rows[i] for i in quick]
            quick = [seqs[i] for i in quick]
        else:
            new_quick, quick = new_rows, seqs
        deque(map(list.extend, map(_TOKENS, quick), new_quick), 0)  # each row's tokens += its new ones
        finished = []
        for i in np.flatnonzero(careful).tolist():
            seq = seqs[i]
            wanted = seq.sampling.logprobs
            seq.accept(new_rows[i], None if wanted is None or sorted_logprobs is None
                       else sorted_logprobs.row(i, new_rows[i], wanted))
            num_tokens[i] = len(seq.tokens)
            if seq.finish:
                finished.append(i)
        # every token but the newest has its K/V written; a block that this filled is published
        computed = num_tokens - 1
        if live.all():
            c.state[_COMPUTED, rows] = computed
        else:
            c.state[_COMPUTED, rows[live]] = computed[live]
        block_size = self.blocks.block_size
        register = self.blocks.register_full_blocks
        for i in np.flatnonzero(live & (computed // block_size > state[_COMPUTED] // block_size)).tolist():
            register(seqs[i].blocks, seqs[i].tokens, int(computed[i]))
        # stream: the sequences whose tokens cross their phase's multiple of the interval, those that finished, and
        # those that got their first token (a prompt found whole in the prefix cache, or whose last prompt token
        # a decode call computed: the first token goes at once, as after a prefill)
        k = self._interval()
        stream = live & (((num_tokens - state[_PROMPT] + rows) // k > (done_before + rows) // k) | (done_before == 0))
        if finished:
            stream[finished] = True
        streamed = list(map(seqs.__getitem__, np.flatnonzero(stream).tolist()))
        out = [(seq, delta) for seq, delta in zip(streamed, map(Sequence.take_delta, streamed)) if delta is not None]
        for i in finished:
            self.remove(seqs[i])
        return out

    def discard(self, batch: ScheduledBatch) -> None:
        """The oldest call in flight returned no result (refused, failed, or a call before it did): its rows are
        taken out of the plan, so the next call is planned from what really happened."""
        assert self.inflight and self.inflight[0] is batch, "calls must be settled in order"
        self.inflight.popleft()
        self._maybe_prefill = True  # its rows' tokens and positions are planned again
        for seq in batch.slot_inits:  # never filled: the next call that has the sequence fills the slot
            seq.slot_ready = False
        for i in range(len(batch.seqs)):
            self._settle_row(batch, i)


class _SortedLogprobs:
    """A call's logprobs, (rows, steps, 2 + 2 K) floats from the worker: per step the chosen token's logprob and
    rank, then K ids and their K logprobs in no order. Sorted for the whole call at once (most likely first,
    ties: lower id first) and converted to Python once, not per row."""

    def __init__(self, raw: np.ndarray, k: int):
        """k: the most alternatives any row asked for (only those are converted)."""
        K = (raw.shape[-1] - 2) // 2
        ids, values = raw[..., 2:2 + K].astype(np.int64), raw[..., 2 + K:]
        order = np.lexsort((ids, -values), axis=-1)[..., :k]
        self.chosen = raw[..., :2].tolist()
        self.ids = np.take_along_axis(ids, order, -1).tolist()
        self.values = np.take_along_axis(values, order, -1).tolist()

    def row(self, i: int, tokens: list[int], k: int) -> list[Logprob]:
        """Row i's logprobs for its sampled tokens, with the k most likely alternatives."""
        return [Logprob(token_id=t, logprob=c[0], rank=int(c[1]), top=list(zip(ids[:k], values[:k])))
                for t, c, ids, values in zip(tokens, self.chosen[i], self.ids[i], self.values[i])]


def _add_prompt_logprobs(seq: Sequence, start: int, raw: np.ndarray) -> None:
    """Adds what a prefill chunk at `start` computed, (chunk_len, 2 + 2 K): position j's row is about prompt token
    start + j + 1. Only tokens still missing are added (a chunk recomputed after a preemption repeats some), and
    none past the prompt (the last position's row is about the token it samples)."""
    first = len(seq.prompt_logprobs) + 1  # the prompt token whose logprob comes next
    assert start + 1 <= first, "prompt logprobs of a chunk that skipped positions"
    end = min(start + len(raw), len(seq.prompt_ids) - 1)  # last prompt token covered
    if end < first:
        return
    rows, k = raw[first - start - 1:end - start][None], seq.sampling.prompt_logprobs
    seq.prompt_logprobs += _SortedLogprobs(rows, k).row(0, seq.prompt_ids[first:end + 1], k)
