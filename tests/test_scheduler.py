"""Scheduling policy without a worker: bucket padding, chunked prefill, decode steps, preemption by recompute."""
from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sampling, Sequence, Status


class NullDetokenizer:
    def push(self, ids, final=False) -> str:
        return ""

    def push_one(self, token_id, final=False) -> str:
        return ""

    def push_many(self, ids) -> str:
        return ""


def seq(n_prompt: int, max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(10, 10 + n_prompt)), Sampling(max_tokens=max_tokens), max_length=256,
                    detokenizer=NullDetokenizer(), eos_ids=frozenset())


def finish_step(sched: Scheduler, batch, token: int = 5) -> None:
    """What the engine does with a batch's result, minus the worker: every row sampled `token` at every step."""
    sched.postprocess(batch, np.full((batch.rows, batch.num_steps), token, np.int32))


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2, 4],
                     prefill_shapes=[(1, 8), (2, 8)], max_steps=4, stream_steps=4,
                     join_steps=4)


def test_prefill_is_chunked_and_padded_to_a_bucket(sched):
    a, b, c = seq(12, rid="a"), seq(3, rid="b"), seq(5, rid="c")
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and (batch.rows, batch.tokens) == (2, 8)
    assert batch.seqs == [a, b] and batch.chunk_lens == [8, 3]
    finish_step(sched, batch)
    batch = sched.schedule()  # a's second chunk and c's whole prompt
    assert batch.seqs == [a, c] and batch.chunk_lens == [4, 5]
    finish_step(sched, batch)
    assert all(s.num_pending == 1 for s in (a, b, c))
    batch = sched.schedule()
    assert not batch.is_prefill and (batch.rows, batch.tokens) == (4, 1) and len(batch.seqs) == 3
    assert batch.num_steps == 4


def test_decode_steps_follow_the_longest_remaining(sched):
    s = seq(3, max_tokens=3)
    sched.add(s)
    finish_step(sched, sched.schedule())
    batch = sched.schedule()
    assert batch.num_steps == 2 and batch.rows == 1


def test_preemption_frees_the_youngest_and_recomputes_it(sched):
    # 12 blocks of 4 tokens; three sequences of 14 prompt tokens need 4 blocks each, then more to decode
    seqs = [seq(14, max_tokens=20, rid=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(4):
        finish_step(sched, sched.schedule())
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
    batch = sched.schedule()
    assert sched.blocks.num_free < sched.blocks.total_blocks
    sched.remove(s)  # aborted while its call is in flight: the worker may still write its blocks
    assert sched.blocks.num_free < sched.blocks.total_blocks and not sched.has_work
    sched.discard(batch)  # the call is over
    assert sched.blocks.num_free == sched.blocks.total_blocks and not sched.has_work


def test_cached_prefix_held_by_a_waiting_request_never_stalls_decode():
    """A waiting request's prefix-cache hits pin blocks; when the only running sequence needs them, they are
    taken back instead of the engine waiting for a wake-up that never comes."""
    blocks = BlockManager(num_blocks=9, block_size=4)  # 8 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1, 2, 4], prefill_shapes=[(1, 32)], max_steps=4, stream_steps=4,
                      join_steps=4)
    cached = seq(17, rid="cached")
    sched.add(cached)
    finish_step(sched, sched.schedule())
    blocks.register_full_blocks(cached.blocks, cached.tokens, cached.num_computed)
    sched.remove(cached)  # its 4 full blocks stay cached in the free list

    runner = Sequence("runner", list(range(500, 515)), Sampling(max_tokens=20), max_length=256,
                      detokenizer=NullDetokenizer(), eos_ids=frozenset())
    sched.add(runner)
    finish_step(sched, sched.schedule())  # 15 prompt tokens + 1 new: 4 blocks
    waiting = seq(18, rid="waiting")  # shares the cached 16-token prefix
    sched.add(waiting)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [runner] and not batch.is_prefill
    assert waiting.status is Status.WAITING and not waiting.blocks.block_ids


def test_waiting_requests_holding_blocks_do_not_block_admission():
    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1], prefill_shapes=[(1, 16)], max_steps=1)
    a = seq(9, rid="a")
    sched.add(a)
    finish_step(sched, sched.schedule())
    blocks.register_full_blocks(a.blocks, a.tokens, a.num_computed)
    sched.remove(a)
    b = seq(10, rid="b")  # shares a's two full blocks
    blocks.allocate_prompt(b.blocks, b.tokens)
    sched.waiting.append(b)  # as if it had been looked at for admission before
    c = Sequence("c", list(range(700, 715)), Sampling(), max_length=256, detokenizer=NullDetokenizer(),
                 eos_ids=frozenset())  # 15 tokens: all 4 blocks
    sched.waiting.appendleft(c)  # e.g. a preempted sequence goes back to the front
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [c]


def one_block_left() -> tuple[Scheduler, Sequence, Sequence]:
    """Two prefilled sequences in a 4-block pool: old (8 tokens, 2 blocks) and young (4 tokens, 1 block), one block
    free; old needs it at 9 tokens, young a second block at 5."""
    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    sched = Scheduler(blocks, decode_batch_sizes=[1, 2], prefill_shapes=[(2, 8)], max_steps=1)
    old, young = seq(7, max_tokens=20, rid="old"), seq(3, max_tokens=20, rid="young")
    for s in (old, young):
        sched.add(s)
    finish_step(sched, sched.schedule())
    return sched, old, young


def test_a_sequence_already_in_the_decode_batch_is_never_preempted():
    """The oldest sequence gets its blocks first; when the next one finds none left, it is preempted itself
    instead of taking the blocks of one already placed in the batch (which would then run with none)."""
    sched, old, young = one_block_left()
    batch = sched.schedule()
    assert batch.seqs == [old, young]
    finish_step(sched, batch)
    # old needs its third block (the last free one) at 9 tokens; young needs a second one at 5 and there is none
    batch = sched.schedule()
    assert batch.seqs == [old] and old.status is Status.RUNNING
    assert young.status is Status.WAITING and not young.blocks.block_ids and sched.num_preemptions == 1
    assert len(old.blocks.block_ids) * 4 >= len(old.tokens)


# ---- pipelined calls ------------------------------------------------------------------------------------------------
def result(batch, tokens: list[list[int]]) -> np.ndarray:
    """A worker result for the batch: tokens[i] for row i, padding rows 0."""
    out = np.zeros((batch.rows, batch.num_steps), np.int32)
    out[:len(tokens)] = tokens
    return out


def test_the_next_call_is_planned_from_the_state_after_the_call_in_flight():
    """Call 2 is planned while call 1 (a prefill) runs: it continues from the position call 1 leaves, counts the
    token call 1 samples, and takes that token from call 1's row on the worker. Applying the results in order
    gives the sequence the tokens in order."""
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(1, 8)], max_steps=4, stream_steps=2, join_steps=2)
    s = seq(6, max_tokens=10)
    sched.add(s)
    first = sched.schedule()
    second = sched.schedule()  # while the first is in flight
    assert sched.schedule() is None  # two calls in flight at most
    assert first.is_prefill and (first.call_index, first.previous_call) == (1, 0) and first.prev_rows == [-1]
    assert not second.is_prefill and second.num_steps == 2 and second.previous_call == 1
    assert second.prev_rows == [0] and second.positions == [6] and second.counters == [1]
    assert s.planned_len == 6 + 1 + 2 and s.tokens == s.prompt_ids  # nothing applied yet
    sched.postprocess(first, result(first, [[50]]))
    third = sched.schedule()  # planned after the second, which is still in flight
    assert third.previous_call == 2 and third.prev_rows == [0] and third.positions == [8] and third.counters == [3]
    sched.postprocess(second, result(second, [[51, 52]]))
    sched.postprocess(third, result(third, [[53, 54]]))
    assert s.output_ids == [50, 51, 52, 53, 54] and s.num_computed == len(s.tokens) - 1
    assert (s.inflight_tokens, s.inflight_computed, s.inflight_calls, s.feed) == (0, 0, 0, None)
    fourth = sched.schedule()  # nothing in flight: real token ids
    assert fourth.previous_call == 0 and fourth.prev_rows == [-1] and fourth.inputs == [54]


def test_a_sequence_that_stops_keeps_its_blocks_until_its_last_call_returns():
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(1, 8)], max_steps=4, stream_steps=2, join_steps=2)
    s = Sequence("stop", list(range(10, 16)), Sampling(max_tokens=20, stop_token_ids=frozenset({99})),
                 max_length=256, detokenizer=NullDetokenizer(), eos_ids=frozenset())
    sched.add(s)
    first, second = sched.schedule(), sched.schedule()
    sched.postprocess(first, result(first, [[99]]))  # the first token stops it; the second call still runs
    assert s.finish and s.output_ids == [99] and not sched.has_work
    assert sched.blocks.num_free < sched.blocks.total_blocks  # the worker may still write them
    assert sched.schedule() is None
    assert sched.postprocess(second, result(second, [[7, 8]])) == []  # discarded
    assert s.output_ids == [99] and sched.blocks.num_free == sched.blocks.total_blocks


def test_the_prefix_cache_learns_only_of_calls_that_returned():
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2, 4],
                      prefill_shapes=[(1, 16)], max_steps=4)
    a = seq(9, rid="a")  # two full blocks
    sched.add(a)
    first = sched.schedule()
    b = seq(9, rid="b")  # the same prompt, while a's prefill is in flight
    sched.add(b)
    second = sched.schedule()
    assert second.seqs == [b] and b.blocks.num_cached_tokens == 0  # a's blocks are not written yet
    sched.postprocess(first, result(first, [[5]]))
    c = seq(9, rid="c")
    sched.add(c)
    sched.postprocess(second, result(second, [[5]]))
    third = sched.schedule()
    assert c in third.seqs and c.blocks.num_cached_tokens == 8


def test_a_refused_call_is_taken_out_of_the_plan():
    """Discarding the calls in flight (the worker refused them) leaves the sequence as if they were never planned:
    the next call sends real token ids and names no previous call."""
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(1, 8)], max_steps=4)
    s = seq(6)
    sched.add(s)
    first = sched.schedule()
    sched.postprocess(first, result(first, [[50]]))
    second, third = sched.schedule(), sched.schedule()
    assert third.prev_rows == [0] and third.previous_call == second.call_index
    sched.discard(second)
    sched.discard(third)
    assert (s.inflight_tokens, s.inflight_computed, s.inflight_calls, s.feed) == (0, 0, 0, None)
    assert s.num_pending == 1 and s.planned_len == 7
    again = sched.schedule()
    assert again.previous_call == 0 and again.prev_rows == [-1] and again.inputs == [50]
    assert again.positions == [6] and again.counters == [1]


def test_preemption_never_takes_a_sequence_a_call_in_flight_uses():
    """Blocks run out while both sequences' call is in flight: the next call leaves the one that needs a block out
    instead of preempting either (the worker is writing their blocks); once that call has returned, the youngest
    is preempted as before."""
    sched, old, young = one_block_left()
    both = sched.schedule()
    assert both.seqs == [old, young]
    # planned after `both`: old needs its third block at 9 tokens (the last free one), young a second at 5
    nxt = sched.schedule()
    assert nxt.seqs == [old] and sched.num_preemptions == 0 and young.status is Status.RUNNING
    finish_step(sched, both)
    finish_step(sched, nxt)
    after = sched.schedule()  # young's call has returned: now it is preempted
    assert young.status is Status.WAITING and sched.num_preemptions == 1 and after.seqs == [old]


def test_decode_calls_are_short_while_requests_arrive():
    """One-step calls right after an arrival (the next arrivals of a burst join within about two steps), then
    STREAM_STEPS-step calls; the worker's --max-steps stays the upper bound."""
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2], prefill_shapes=[(1, 8)],
                      max_steps=16)
    sched.add(seq(3, max_tokens=100, rid="a"))

    def steps(sched: Scheduler, n: int) -> list[int]:
        out = []
        for _ in range(n):
            batch = sched.schedule()
            out.append(0 if batch.is_prefill else batch.num_steps)
            finish_step(sched, batch)
        return out

    assert steps(sched, 8) == [0, 1, 1, 1, 2, 2, 2, 2]
    sched.add(seq(3, max_tokens=100, rid="b"))
    assert steps(sched, 6) == [0, 1, 1, 1, 2, 2]
    capped = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1], prefill_shapes=[(1, 8)],
                       max_steps=1, stream_steps=4)
    capped.add(seq(3, max_tokens=100))
    assert steps(capped, 7) == [0, 1, 1, 1, 1, 1, 1]


# ---- priorities, budgets, sampling slots ---------------------------------------------------------------------------
def prio_seq(rid: str, priority: int, n_prompt: int = 3, first: int = 10, **sampling) -> Sequence:
    return Sequence(rid, list(range(first, first + n_prompt)), Sampling(max_tokens=8, **sampling), max_length=256,
                    detokenizer=NullDetokenizer(), eos_ids=frozenset(), priority=priority)


def test_priority_decides_admission_and_preemption_under_contention():
    """Two rows: the lowest priority values run first (first come, first served among equals), and the running
    sequence with the highest value is the one preempted."""
    sched = Scheduler(BlockManager(num_blocks=13, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(2, 8)], max_steps=1)
    late_low, first_mid, urgent, second_mid = (prio_seq("late_low", 5), prio_seq("first_mid", 1),
                                               prio_seq("urgent", -3), prio_seq("second_mid", 1))
    for s in (late_low, first_mid, urgent, second_mid):
        sched.add(s)
    assert [s.request_id for s in sched.waiting] == ["urgent", "first_mid", "second_mid", "late_low"]
    batch = sched.schedule()
    assert batch.seqs == [urgent, first_mid]
    finish_step(sched, batch)
    assert sched._preempt_youngest() and first_mid.status is Status.WAITING  # the higher value goes first
    assert sched.waiting[0] is first_mid  # and comes back ahead of later arrivals of its priority


def running_ids(sched: Scheduler) -> list[str]:
    return sorted(s.request_id for s in sched.running)


def test_a_higher_priority_arrival_preempts_the_lowest_priority_running_sequence_for_a_row():
    """Both rows are taken: an urgent arrival takes the row of the running sequence with the highest priority
    value (latest arrival among equals), which is recomputed later; an arrival of equal priority waits."""
    sched = Scheduler(BlockManager(num_blocks=40, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(2, 8)], max_steps=1, max_inflight=1)
    low, lower, later_lower = prio_seq("low", 2), prio_seq("lower", 5), prio_seq("later_lower", 5)
    for s in (low, lower):
        sched.add(s)
    finish_step(sched, sched.schedule())
    finish_step(sched, sched.schedule())
    sched.add(later_lower)  # equal to a running one: no preemption
    batch = sched.schedule()
    assert batch.seqs == [low, lower] and sched.num_preemptions == 0
    finish_step(sched, batch)
    urgent = prio_seq("urgent", 0)
    sched.add(urgent)
    batch = sched.schedule()
    assert sched.num_preemptions == 1 and lower.status is Status.WAITING and not lower.blocks.block_ids
    assert batch.is_prefill and batch.seqs == [urgent] and running_ids(sched) == ["low", "urgent"]
    assert [s.request_id for s in sched.waiting] == ["lower", "later_lower"]  # ahead of its later equal
    finish_step(sched, batch)
    while sched.has_work:  # everybody finishes, the preempted one from a recompute; no block leaks
        finish_step(sched, sched.schedule())
    assert all(len(s.output_ids) == 8 for s in (low, lower, later_lower, urgent))
    assert sched.blocks.num_free == sched.blocks.total_blocks


def test_a_higher_priority_arrival_preempts_for_blocks_once_the_call_in_flight_returns():
    """The pool is full: the urgent arrival frees the blocks of the lowest-priority sequence. While a call in
    flight still uses that sequence it is left out of the next call, and preempted once that call returns."""
    sched = Scheduler(BlockManager(num_blocks=9, block_size=4), decode_batch_sizes=[1, 2, 4],
                      prefill_shapes=[(2, 8)], max_steps=1)  # two calls in flight
    # 4 blocks each, no prefix shared: all 8 taken
    a, b = prio_seq("a", 1, n_prompt=14, first=100), prio_seq("b", 3, n_prompt=14, first=200)
    for s in (a, b):
        sched.add(s)
    finish_step(sched, sched.schedule())
    finish_step(sched, sched.schedule())
    in_flight = sched.schedule()
    assert in_flight.seqs == [a, b] and sched.blocks.num_free == 0
    urgent = prio_seq("urgent", 0, n_prompt=5, first=300)
    sched.add(urgent)
    second = sched.schedule()  # b is still in flight: not preempted yet, and left out of this call
    assert second.seqs == [a] and b.status is Status.RUNNING and sched.num_preemptions == 0
    finish_step(sched, in_flight)
    finish_step(sched, second)
    batch = sched.schedule()
    assert b.status is Status.WAITING and sched.num_preemptions == 1 and batch.seqs == [urgent]
    finish_step(sched, batch)
    while sched.has_work:
        finish_step(sched, sched.schedule())
    assert [len(s.output_ids) for s in (a, b, urgent)] == [8, 8, 8]
    assert sched.blocks.num_free == sched.blocks.total_blocks


def test_budgets_cap_rows_and_tokens_per_call():
    sched = Scheduler(BlockManager(num_blocks=40, block_size=4), decode_batch_sizes=[1, 2, 4],
                      prefill_shapes=[(4, 8)], max_steps=1, max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [prio_seq(f"s{i}", 0, n_prompt=6) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert len(sched.running) == 3 and sum(batch.chunk_lens) <= 10 and batch.chunk_lens == [6, 4]


def test_sampling_slots_are_given_filled_once_and_returned():
    sched = Scheduler(BlockManager(num_blocks=40, block_size=4), decode_batch_sizes=[1, 2],
                      prefill_shapes=[(2, 8)], max_steps=2, num_slots=2)  # one slot
    a, b, plain = (prio_seq("a", 0, repetition_penalty=1.2), prio_seq("b", 0, logit_bias=((5,), (1.0,))),
                   prio_seq("plain", 0))
    for s in (a, b, plain):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a] and a.slot == 1 and batch.slot_inits == [a] and batch.slots == [1]
    sched.discard(batch)  # never ran: the slot is filled again by the next call
    batch = sched.schedule()
    assert batch.slot_inits == [a]
    finish_step(sched, batch)
    batch = sched.schedule()
    assert batch.slot_inits == [] and batch.slots == [1]
    sched.remove(a)
    finish_step(sched, batch)
    assert sched.free_slots == [1] and a.slot == 0
    batch = sched.schedule()
    assert b in batch.seqs and b.slot == 1 and batch.slot_inits == [b]


# ---- vectorized decode, streaming interval ---------------------------------------------------------------------------
class PieceDetokenizer:
    """Token t's text is f"<t>": what a stream received can be checked against the tokens."""

    def push_one(self, token_id, final=False) -> str:
        return f"<{token_id}>"

    def push_many(self, ids) -> str:
        return "".join(f"<{t}>" for t in ids)


def text_seq(rid: str, n_prompt: int = 3, **sampling) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n_prompt)), Sampling(**sampling), max_length=256,
                    detokenizer=PieceDetokenizer(), eos_ids=frozenset({2}))


def run_one_step_calls(sched: Scheduler, seqs: list[Sequence], tokens, calls: int) -> dict[str, list]:
    """Prefill, then `calls` one-step decode calls where row i samples tokens(i, call); returns each stream's
    messages as (call, token ids, text, finish)."""
    for s in seqs:
        sched.add(s)
    got: dict[str, list] = {s.request_id: [] for s in seqs}
    for call in range(calls):
        batch = sched.schedule()
        if batch is None:
            break
        sampled = np.array([[tokens(batch.seqs.index(s) if s in batch.seqs else 0, call)] for s in batch.seqs]
                           + [[0]] * (batch.rows - len(batch.seqs)), np.int32)
        for s, delta in sched.postprocess(batch, sampled):
            got[s.request_id].append((call, delta.token_ids, delta.text, delta.finish))
    return got


def test_streams_get_their_tokens_every_stream_interval_tokens_staggered():
    """With stream_interval 4 every stream gets its first token at once, then a message every 4 tokens, the
    streams' messages spread over the steps; the messages carry every token and its text, in order."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2, 4], prefill_shapes=[(4, 8)],
                      max_steps=1, stream_steps=1, join_steps=1, max_inflight=1, stream_interval=4)
    seqs = [text_seq(f"s{i}", max_tokens=100, ignore_eos=True) for i in range(4)]
    got = run_one_step_calls(sched, seqs, lambda i, call: 100 + call, calls=17)
    per_call = {}
    for s in seqs:
        msgs = got[s.request_id]
        assert msgs[0][0] == 0 and msgs[0][1] == [100]  # the prefill's token at once
        calls = [m[0] for m in msgs]
        assert all(b - a <= 4 for a, b in zip(calls, calls[1:]))  # at least every 4 tokens
        assert all(len(m[1]) <= 4 for m in msgs)
        ids = [t for m in msgs for t in m[1]]
        assert ids == s.output_ids[:len(ids)] and "".join(m[2] for m in msgs) == "".join(f"<{t}>" for t in ids)
        for c in calls[1:]:
            per_call[c] = per_call.get(c, 0) + 1
    assert max(per_call.values()) < len(seqs)  # staggered: not every stream at the same step


def test_the_default_interval_follows_the_load():
    import scheduler_svc.scheduler as scheduler_module

    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2, 4, 8, 16],
                      prefill_shapes=[(16, 8)], max_steps=1)
    assert sched.stream_interval == 0
    sched.running = [None] * scheduler_module.STREAM_ROWS
    assert sched._interval() == 1  # every token up to STREAM_ROWS running
    sched.running = [None] * (scheduler_module.STREAM_ROWS + 1)
    assert sched._interval() == 2
    sched.running = [None] * (100 * scheduler_module.STREAM_ROWS)
    assert sched._interval() == scheduler_module.MAX_STREAM_INTERVAL == 4  # issue 7: tokens every 4 steps
    assert Scheduler(BlockManager(num_blocks=8, block_size=4), decode_batch_sizes=[1], prefill_shapes=[(1, 8)],
                     max_steps=1, stream_interval=9).stream_interval == 4


def test_a_finish_sends_what_was_held_back_at_once():
    """A stream that finishes (EOS, max_tokens) between its messages gets its unsent tokens with the finish."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2, 4], prefill_shapes=[(4, 8)],
                      max_steps=1, stream_steps=1, join_steps=1, max_inflight=1, stream_interval=4)
    eos, length = text_seq("eos", max_tokens=100), text_seq("length", max_tokens=6, ignore_eos=True)
    got = run_one_step_calls(sched, [eos, length], lambda i, call: 2 if (i, call) == (0, 6) else 50 + call, calls=10)
    assert eos.finish == Finish.STOP and eos.output_ids[-1] == 2 and len(eos.output_ids) == 7
    assert length.finish == Finish.LENGTH and len(length.output_ids) == 6
    for s in (eos, length):
        msgs = got[s.request_id]
        assert [t for m in msgs for t in m[1]] == s.output_ids and msgs[-1][3] == s.finish
        assert sum(1 for m in msgs if m[3]) == 1
    assert got["eos"][-1][2].endswith("<2>")
    assert not sched.has_work and sched.blocks.num_free == sched.blocks.total_blocks


def test_an_abort_carries_the_tokens_not_yet_streamed():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2], prefill_shapes=[(2, 8)],
                      max_steps=1, stream_steps=1, join_steps=1, max_inflight=1, stream_interval=4)
    s = text_seq("a", max_tokens=100, ignore_eos=True)
    got = run_one_step_calls(sched, [s], lambda i, call: 60 + call, calls=3)
    sent = [t for m in got["a"] for t in m[1]]
    assert sent != s.output_ids  # some tokens wait for the next message
    delta = s.abort("gone")
    assert sent + delta.token_ids == s.output_ids and delta.finish == Finish.ABORT and delta.text
    sched.remove(s)
    assert sched.blocks.num_free == sched.blocks.total_blocks and s.counters is None


def test_rows_that_may_end_take_their_tokens_one_by_one_in_a_multi_step_call():
    """In one 4-step call: a row that samples EOS at step 2, one that reaches max_tokens at step 3, one with a
    stop id it may not stop on yet (min_tokens), one that cannot end: each keeps exactly the tokens it would have
    kept one step at a time."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2, 4], prefill_shapes=[(4, 8)],
                      max_steps=4, stream_steps=4, join_steps=4, max_inflight=1)
    eos = text_seq("eos", max_tokens=50)
    length = text_seq("length", max_tokens=4, ignore_eos=True)
    early = text_seq("min", max_tokens=50, min_tokens=4, stop_token_ids=frozenset({7}))
    plain = text_seq("plain", max_tokens=50, ignore_eos=True)
    seqs = [eos, length, early, plain]
    for s in seqs:
        sched.add(s)
    finish_step(sched, sched.schedule(), token=5)  # prefill: one token each
    batch = sched.schedule()
    assert batch.num_steps == 4 and batch.seqs == seqs
    sampled = np.array([[5, 2, 6, 6], [5, 5, 5, 5], [7, 7, 7, 8], [2, 2, 2, 2]], np.int32)
    out = dict((s.request_id, d) for s, d in sched.postprocess(batch, sampled))
    assert eos.output_ids == [5, 5, 2] and eos.finish == Finish.STOP
    assert length.output_ids == [5, 5, 5, 5] and length.finish == Finish.LENGTH
    assert early.output_ids == [5, 7, 7, 7] and early.finish == Finish.STOP and early.stop_reason == "7"
    assert plain.output_ids == [5, 2, 2, 2, 2] and plain.finish == Finish.NONE
    assert out["plain"].token_ids == [2, 2, 2, 2] and out["plain"].text == "<2><2><2><2>"
    assert out["eos"].token_ids == [5, 2] and out["eos"].finish == Finish.STOP
    assert sched.running == [plain] and plain.num_computed == len(plain.tokens) - 1


def test_counters_move_into_the_scheduler_and_back():
    """Counters live in the scheduler's arrays while it holds a sequence (growing past their first capacity) and
    in the sequence before and after."""
    sched = Scheduler(BlockManager(num_blocks=1024, block_size=4), decode_batch_sizes=[1, 2, 4],
                      prefill_shapes=[(4, 8)], max_steps=1)
    seqs = [seq(3, rid=str(i)) for i in range(150)]
    seqs[0].num_computed = 2
    for s in seqs:
        sched.add(s)
    assert seqs[0].counters is sched.counters and seqs[0].num_computed == 2
    assert len({s.row for s in seqs}) == 150 and sched.counters.state.shape[1] >= 150
    seqs[149].inflight_calls = 3
    assert seqs[149].inflight_calls == 3 and sched.counters.inflight_calls[seqs[149].row] == 3
    seqs[149].inflight_calls = 0
    for s in seqs:
        sched.remove(s)
    assert all(s.counters is None and s.row == -1 for s in seqs) and seqs[0].num_computed == 2


def test_encode_batch_serializes_every_row_and_table():
    """encode_batch's bytes (the block tables appended as a raw field) parse to the call as planned."""
    from scheduler_svc.engine import encode_batch
    from tinyvllm.v1 import worker_pb2

    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), decode_batch_sizes=[1, 2, 4], prefill_shapes=[(4, 8)],
                      max_steps=2, stream_steps=2, join_steps=2)
    seqs = [text_seq("a", 7, max_tokens=20, temperature=0.5, seed=3), text_seq("b", 2, max_tokens=20, top_k=5),
            text_seq("c", 2, max_tokens=20, temperature=0.0)]
    for s in seqs:
        sched.add(s)
    finish_step(sched, sched.schedule())
    batch = sched.schedule()
    request = worker_pb2.ExecuteRequest.FromString(encode_batch(batch, 6, "me"))
    assert (request.rows, request.tokens, request.num_steps, request.instance_id) == (4, 1, 2, "me")
    tables = np.frombuffer(request.block_tables, np.int32).reshape(4, 6)
    for i, s in enumerate(seqs):
        ids = list(s.blocks.block_ids)
        assert tables[i, :len(ids)].tolist() == ids and not tables[i, len(ids):].any()
    assert not tables[3:].any()
    assert np.frombuffer(request.positions, np.int32).tolist() == [7, 2, 2, 0]
    assert np.frombuffer(request.temperature, np.float32).tolist() == [0.5, 1.0, 0.0, 0.0]
    assert np.frombuffer(request.top_k, np.int32).tolist() == [0, 5, 0, 0]
    assert np.frombuffer(request.seeds, np.uint32).tolist() == [3, 0, 0, 0]
    assert np.frombuffer(request.chunk_lens, np.int32).tolist() == [1, 1, 1, 0]
    assert np.frombuffer(request.token_ids, np.int32).tolist() == [5, 5, 5, 0]
