"""Scheduling policy without a worker: bucket padding, chunked prefill, decode steps, preemption by recompute."""
from __future__ import annotations

import pytest

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Sampling, Sequence, Status


class NullDetokenizer:
    def push(self, ids, final=False) -> str:
        return ""


def seq(n_prompt: int, max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(10, 10 + n_prompt)), Sampling(max_tokens=max_tokens), max_length=256,
                    detokenizer=NullDetokenizer(), table_width=16, eos_ids=frozenset())


def finish_step(batch, token: int = 5) -> None:
    """What the engine does with a batch's result, minus the worker."""
    for s, n in zip(batch.seqs, batch.chunk_lens):
        if batch.is_prefill:
            s.num_computed += n
            if s.num_pending == 0:
                s.append([token])
                s.num_computed = len(s.tokens) - 1
        else:
            s.append([token] * batch.num_steps)
            s.num_computed = len(s.tokens) - 1


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2, 4],
                     prefill_shapes=[(1, 8), (2, 8)], max_steps=4)


def test_prefill_is_chunked_and_padded_to_a_bucket(sched):
    a, b, c = seq(12, rid="a"), seq(3, rid="b"), seq(5, rid="c")
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and (batch.rows, batch.tokens) == (2, 8)
    assert batch.seqs == [a, b] and batch.chunk_lens == [8, 3]
    finish_step(batch)
    batch = sched.schedule()  # a's second chunk and c's whole prompt
    assert batch.seqs == [a, c] and batch.chunk_lens == [4, 5]
    finish_step(batch)
    assert all(s.num_pending == 1 for s in (a, b, c))
    batch = sched.schedule()
    assert not batch.is_prefill and (batch.rows, batch.tokens) == (4, 1) and len(batch.seqs) == 3
    assert batch.num_steps == 4


def test_decode_steps_follow_the_longest_remaining(sched):
    s = seq(3, max_tokens=3)
    sched.add(s)
    finish_step(sched.schedule())
    batch = sched.schedule()
    assert batch.num_steps == 2 and batch.rows == 1


def test_preemption_frees_the_youngest_and_recomputes_it(sched):
    # 12 blocks of 4 tokens; three sequences of 14 prompt tokens need 4 blocks each, then more to decode
    seqs = [seq(14, max_tokens=20, rid=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(4):
        finish_step(sched.schedule())
    assert all(s.status is Status.RUNNING and s.num_pending == 1 for s in seqs)
    batch = sched.schedule()  # decode needs blocks for 4 more positions each: 12 + 3 > 12
    assert not batch.is_prefill
    assert seqs[2].status is Status.WAITING and seqs[2].num_computed == 0 and seqs[2].num_preemptions == 1
    assert seqs[2] not in batch.seqs and sched.waiting[0] is seqs[2]
    assert sched.blocks.num_free >= 0
    for s in batch.seqs:
        assert len(s.blocks.block_ids) * 4 >= len(s.tokens) + batch.num_steps - 1


def test_removal_returns_blocks(sched):
    s = seq(9)
    sched.add(s)
    sched.schedule()
    assert sched.blocks.num_free < sched.blocks.total_blocks
    sched.remove(s)
    assert sched.blocks.num_free == sched.blocks.total_blocks and not sched.has_work


def test_cached_prefix_held_by_a_waiting_request_never_stalls_decode():
    """A waiting request's prefix-cache hits pin blocks; when the only running sequence needs them, they are
    taken back instead of the engine waiting for a wake-up that never comes."""
    blocks = BlockManager(num_blocks=9, block_size=4)  # 8 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1, 2, 4], prefill_shapes=[(1, 32)], max_steps=4)
    cached = seq(17, rid="cached")
    sched.add(cached)
    finish_step(sched.schedule())
    blocks.register_full_blocks(cached.blocks, cached.tokens, cached.num_computed)
    sched.remove(cached)  # its 4 full blocks stay cached in the free list

    runner = Sequence("runner", list(range(500, 515)), Sampling(max_tokens=20), max_length=256,
                      detokenizer=NullDetokenizer(), table_width=16, eos_ids=frozenset())
    sched.add(runner)
    finish_step(sched.schedule())  # 15 prompt tokens + 1 new: 4 blocks
    waiting = seq(18, rid="waiting")  # shares the cached 16-token prefix
    sched.add(waiting)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [runner] and not batch.is_prefill
    assert waiting.status is Status.WAITING and waiting.blocks.block_ids == []


def test_waiting_requests_holding_blocks_do_not_block_admission():
    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1], prefill_shapes=[(1, 16)], max_steps=1)
    a = seq(9, rid="a")
    sched.add(a)
    finish_step(sched.schedule())
    blocks.register_full_blocks(a.blocks, a.tokens, a.num_computed)
    sched.remove(a)
    b = seq(10, rid="b")  # shares a's two full blocks
    blocks.allocate_prompt(b.blocks, b.tokens)
    sched.waiting.append(b)  # as if it had been looked at for admission before
    c = Sequence("c", list(range(700, 715)), Sampling(), max_length=256, detokenizer=NullDetokenizer(),
                 table_width=16, eos_ids=frozenset())  # 15 tokens: all 4 blocks
    sched.waiting.appendleft(c)  # e.g. a preempted sequence goes back to the front
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [c]


def test_a_sequence_already_in_the_decode_batch_is_never_preempted():
    """The oldest sequence gets its blocks first; when the next one finds none left, it is preempted itself
    instead of taking the blocks of one already placed in the batch (which would then run with none)."""
    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1, 2], prefill_shapes=[(2, 8)], max_steps=1)
    old, young = seq(7, max_tokens=20, rid="old"), seq(3, max_tokens=20, rid="young")
    for s in (old, young):
        sched.add(s)
    finish_step(sched.schedule())  # 8 + 4 tokens: 2 + 1 blocks, one left
    batch = sched.schedule()
    assert batch.seqs == [old, young]
    finish_step(batch)
    # old needs its third block (the last free one) at 9 tokens; young needs a second one at 5 and there is none
    batch = sched.schedule()
    assert batch.seqs == [old] and old.status is Status.RUNNING
    assert young.status is Status.WAITING and young.blocks.block_ids == [] and sched.num_preemptions == 1
    assert len(old.blocks.block_ids) * 4 >= len(old.tokens)
