"""Continuous batching policy: what runs next, padded to a bucket the worker has a graph for.

Each call to `schedule` returns one batch: prefill chunks when any sequence needs one (new requests get their
first token quickly), otherwise one decode batch of every running sequence, several steps long. Finished
sequences leave at once; new ones join at the next call. When decode needs blocks that are not there, the
youngest running sequence is preempted: its blocks are released and it is recomputed later.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from scheduler_svc.block_manager import BlockManager, NoFreeBlocks
from scheduler_svc.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    rows: int  # bucket rows, >= len(seqs)
    tokens: int  # bucket tokens per row (1 for decode)
    chunk_lens: list[int]  # valid tokens per sequence
    num_steps: int = 1

    @property
    def is_prefill(self) -> bool:
        return self.tokens > 1


class Scheduler:
    def __init__(self, blocks: BlockManager, decode_batch_sizes: list[int], prefill_shapes: list[tuple[int, int]],
                 max_steps: int):
        self.blocks = blocks
        self.decode_batch_sizes = sorted(decode_batch_sizes)
        self.max_running = self.decode_batch_sizes[-1]
        # a 1-token chunk is a decode bucket of the same rows
        self.prefill_shapes = sorted({*prefill_shapes, *((b, 1) for b in self.decode_batch_sizes)},
                                     key=lambda s: (s[1], s[0]))
        self.max_steps = max_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out (finished or aborted) and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.sync_table_row()

    # ---- policy -------------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """The next batch, or None when nothing can run. A pass that only freed blocks (by preempting) is
        followed by another, so the caller never waits for a wake-up while runnable work exists."""
        for _ in range(len(self.running) + len(self.waiting) + 1):
            self._admit()
            prefill = [s for s in self.running if s.in_prefill]
            batch = self._prefill_batch(prefill) if prefill else None
            if batch is None:
                decode = [s for s in self.running if s.num_pending == 1]
                batch = self._decode_batch(decode) if decode else None
            if batch is not None or not self.running:
                return batch
        return None

    def _admit(self) -> None:
        """Moves waiting sequences to running while rows and blocks for their first chunk are free."""
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not seq.blocks.block_ids:
                self.blocks.allocate_prompt(seq.blocks, seq.tokens)
                seq.num_computed = seq.blocks.num_cached_tokens
                if not seq.output_ids:  # reported for the admission that produces the first token
                    seq.cached_prompt_tokens = seq.num_computed
            first_chunk = min(seq.num_pending, self.prefill_shapes[-1][1])
            if not self.blocks.can_grow(seq.blocks, seq.num_computed + first_chunk):
                # nothing running will free blocks: take back what other waiting sequences hold and retry
                if self.running or not self._release_waiting(keep=seq):
                    break
                continue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _prefill_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        longest = max(s.num_pending for s in seqs)
        max_rows_any = max(b for b, _ in self.prefill_shapes)
        # smallest chunk length that covers the longest prompt (or the largest there is), then enough rows
        t_options = sorted({t for _, t in self.prefill_shapes if t > 1})
        tokens = next((t for t in t_options if t >= longest), t_options[-1])
        row_options = sorted(b for b, t in self.prefill_shapes if t == tokens)
        n = min(len(seqs), max_rows_any, row_options[-1])
        rows = next(b for b in row_options if b >= n)
        chosen, lens = [], []
        for seq in seqs[:n]:
            chunk = min(seq.num_pending, tokens)
            try:
                self.blocks.grow(seq.blocks, seq.num_computed + chunk)
            except NoFreeBlocks:
                continue
            seq.sync_table_row()
            chosen.append(seq)
            lens.append(chunk)
        if not chosen:
            self._preempt_youngest()
            return None
        return ScheduledBatch(chosen, rows, tokens, lens)

    def _decode_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """Oldest first, every decoding sequence gets blocks for the call's steps. When blocks run out, the
        youngest sequence not yet in this batch is preempted, or, if there is none, the sequence itself: a
        sequence already placed in the batch is never preempted (it would run with no blocks)."""
        # run as many steps as the longest-lived row can use; rows that finish early discard the rest
        steps = max(1, min(self.max_steps, max(s.remaining for s in seqs)))
        ready: list[Sequence] = []
        for seq in seqs:
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an older one
            # positions written: len(tokens) - 1 ... len(tokens) + steps - 2, within the sequence's limit
            need = min(len(seq.tokens) + steps - 1, seq.max_length)
            while not self.blocks.can_grow(seq.blocks, need):
                if not self._preempt_youngest(spare=[*ready, seq]):
                    self._preempt(seq)
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq.blocks, need)
            seq.sync_table_row()
            ready.append(seq)
        if not ready:
            return None
        rows = next(b for b in self.decode_batch_sizes if b >= len(ready))
        return ScheduledBatch(ready, rows, 1, [1] * len(ready), num_steps=steps)

    def _preempt_youngest(self, spare: list[Sequence] = ()) -> bool:
        """Frees blocks: first the prefix-cache references a waiting sequence holds, then the blocks of the most
        recently admitted running sequence not in `spare`. False if there was nothing to free."""
        if self._release_waiting():
            return True
        victims = [s for s in self.running if s not in spare]
        if not victims:
            return False
        self._preempt(victims[-1])
        return True

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self._requeue(victim)
        self.num_preemptions += 1
        log.info("preempted %s (%d tokens) to free KV blocks", victim.request_id, len(victim.tokens))

    def _release_waiting(self, keep: Sequence | None = None) -> bool:
        """Drops the prefix-cache references held by waiting sequences (not `keep`); False if none held any."""
        holding = [s for s in self.waiting if s.blocks.block_ids and s is not keep]
        for seq in holding:
            self.blocks.release(seq.blocks)
            seq.sync_table_row()
            seq.num_computed = 0
        return bool(holding)

    def preempt_all(self) -> None:
        """The worker lost its KV contents: every sequence is recomputed from its tokens, holding no blocks."""
        self._release_waiting()  # a waiting head may hold prefix-cache references
        for seq in reversed(self.running):
            self._requeue(seq)
        self.running.clear()

    def _requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue holding no blocks; its tokens are prefilled again when admitted."""
        self.blocks.release(seq.blocks)
        seq.sync_table_row()
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
