"""vLLM's prompt_logprobs: every prompt token after the first gets its log-probability given the tokens before it,
with its rank and the top alternatives, once, with the first new token.

The scheduler's part without a worker (chunks across calls, the token after a chunk in its padding, a preemption
that recomputes chunks, the prefix cache skipped); then through the shared services against the NumPy reference
forward pass: chunked prefill, sampled tokens unchanged, n samples, validation."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Sampling, Sequence
from tests.reference import NumpyLlama
from tests.test_integration import generate, params, tokenizer, wait_idle  # noqa: F401
from tests.test_scheduler import NullDetokenizer
from tinyvllm.v1 import scheduler_pb2 as pb

K = 20  # alternatives the worker returns per position


# ---- the scheduler, with a fake worker ------------------------------------------------------------------------------
def plp_seq(prompt: list[int], top: int | None = 2, rid: str = "p") -> Sequence:
    return Sequence(rid, prompt, Sampling(max_tokens=4, prompt_logprobs=top), max_length=256,
                    detokenizer=NullDetokenizer(), eos_ids=frozenset())


def fake_prompt_logprobs(batch) -> np.ndarray:
    """What a worker would return: position j of a row starting at p is about token p + j + 1; its logprob is
    -(p + j + 1) and its rank p + j + 1, so each entry says which position it came from."""
    out = np.zeros((batch.rows, batch.tokens, 2 + 2 * K), np.float32)
    for i, start in enumerate(batch.positions):
        target = start + 1 + np.arange(batch.tokens)
        out[i, :, 0], out[i, :, 1] = -target, target
        out[i, :, 2:2 + K] = np.arange(K)[::-1]  # ids in no order: the scheduler sorts them
        out[i, :, 2 + K:] = -np.arange(K)[::-1] - 0.5
    return out


def run(sched: Scheduler, batch, token: int = 7):
    sampled = np.full((batch.rows, batch.num_steps), token, np.int32)
    plp = fake_prompt_logprobs(batch) if batch.prompt_logprobs else None
    return sched.postprocess(batch, sampled, None, plp)


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler(BlockManager(num_blocks=24, block_size=4), decode_batch_sizes=[1, 2, 4],
                     prefill_shapes=[(1, 8), (2, 8)], max_steps=2, stream_steps=2, join_steps=2)


def test_chunks_carry_the_next_token_and_the_logprobs_come_once(sched):
    prompt = list(range(100, 120))  # 20 tokens: chunks of 7 and 7 (the next token in the padding), then 6
    s = plp_seq(prompt)
    sched.add(s)
    deltas, chunks = [], []
    while not s.output_ids or len(chunks) < 3:
        batch = sched.schedule()
        assert batch.prompt_logprobs and batch.rows == 1
        chunks.append((batch.positions[0], batch.chunk_lens[0], list(batch.inputs[0])))
        deltas += [d for _, d in run(sched, batch)]
    assert chunks == [(0, 7, prompt[:8]), (7, 7, prompt[7:15]), (14, 6, prompt[14:])]
    assert [d.prompt_logprobs is not None for d in deltas] == [True]
    got = deltas[0].prompt_logprobs
    assert [e.token_id for e in got] == prompt[1:]
    assert [e.logprob for e in got] == [-t for t in range(1, 20)] and [e.rank for e in got] == list(range(1, 20))
    assert got[0].top == [(0, -0.5), (1, -1.5)]  # the 2 most likely, most likely first
    batch = sched.schedule()  # decode: no prompt logprobs any more
    assert not batch.is_prefill and not batch.prompt_logprobs
    assert all(d.prompt_logprobs is None for _, d in run(sched, batch))


def test_runs_alone_and_skips_the_prefix_cache(sched):
    prompt = list(range(200, 213))
    plain = plp_seq(prompt, top=None, rid="plain")
    sched.add(plain)
    while not plain.output_ids:
        run(sched, sched.schedule())
    # the prompt's full blocks are cached now: a request with prompt logprobs computes them anyway, alone
    wants, other = plp_seq(prompt, rid="wants"), plp_seq(list(range(300, 305)), top=None, rid="other")
    sched.add(wants)
    sched.add(other)
    batch = sched.schedule()
    assert batch.seqs == [wants] and batch.positions == [0] and wants.cached_prompt_tokens == 0
    run(sched, batch)
    batch = sched.schedule()
    assert batch.seqs == [wants] and batch.positions == [7]
    run(sched, batch)
    batch = sched.schedule()
    assert batch.seqs == [other] and not batch.prompt_logprobs
    assert len(wants.prompt_logprobs) == 12
    later = plp_seq(prompt, top=None, rid="later")  # without prompt logprobs: the cache as usual
    sched.add(later)
    run(sched, batch)
    sched.schedule()  # admits it
    assert later.cached_prompt_tokens == 12


def test_a_preemption_between_chunks_neither_repeats_nor_loses_any(sched):
    prompt = list(range(100, 120))
    s = plp_seq(prompt)
    sched.add(s)
    run(sched, sched.schedule())  # the first chunk: tokens 1..7
    assert len(s.prompt_logprobs) == 7
    sched._preempt(s)  # recomputed from the start
    deltas = []
    while not s.output_ids:
        batch = sched.schedule()
        assert batch.prompt_logprobs
        deltas += [d for _, d in run(sched, batch)]
    assert [e.token_id for e in deltas[0].prompt_logprobs] == prompt[1:]
    assert [e.logprob for e in deltas[0].prompt_logprobs] == [-t for t in range(1, 20)]
    sched._preempt(s)  # after the first token: recomputed as any sequence, prompt logprobs complete
    batch = sched.schedule()
    assert not batch.prompt_logprobs and s.blocks.num_cached_tokens > 0
    assert all(d.prompt_logprobs is None for _, d in run(sched, batch))


def test_with_a_stream_interval_they_come_on_the_first_message():
    """Streaming every 4 tokens: the first message still comes with the first token and carries the prompt
    logprobs, also when a decode call samples it (a token budget below the chunk leaves the prompt's last token to
    a decode call) and when other streams' decode rows share the calls."""
    sched = Scheduler(BlockManager(num_blocks=48, block_size=4), decode_batch_sizes=[1, 2, 4, 8],
                      prefill_shapes=[(1, 8), (2, 8)], max_steps=1, stream_steps=1, join_steps=1,
                      max_num_batched_tokens=5, stream_interval=4)
    # 4 others: s's Counters row is 4, whose phase would stream its first token with its fourth
    others = [Sequence(f"o{i}", list(range(300 + 10 * i, 303 + 10 * i)), Sampling(max_tokens=50), max_length=256,
                       detokenizer=NullDetokenizer(), eos_ids=frozenset()) for i in range(4)]
    for o in others:
        sched.add(o)
    for _ in range(3):  # the others are decoding
        run(sched, sched.schedule())
    prompt = list(range(100, 106))
    s = plp_seq(prompt)
    sched.add(s)
    messages = []
    for call in range(6):
        batch = sched.schedule()
        messages += [(call, batch.is_prefill, d) for q, d in run(sched, batch) if q is s]
    call, prefill, first = messages[0]
    assert not prefill and first.token_ids == [7]  # the decode call after its only chunk (5 tokens) sampled it
    assert [e.token_id for e in first.prompt_logprobs] == prompt[1:]
    assert [e.logprob for e in first.prompt_logprobs] == [-t for t in range(1, 6)]
    assert all(d.prompt_logprobs is None for _, _, d in messages[1:])


def test_a_one_token_prompt_has_none(sched):
    s = plp_seq([5])
    assert not s.wants_prompt_logprobs
    sched.add(s)
    batch = sched.schedule()
    assert not batch.is_prefill and not batch.prompt_logprobs


# ---- through the services, against the NumPy reference ------------------------------------------------------------
PROMPT = [1] + [(13 * i) % 370 + 15 for i in range(99)]  # 100 tokens: chunks of 63 and 37 in the 1x64 bucket


@pytest.fixture(scope="module")
def reference(demo_checkpoint) -> NumpyLlama:
    return NumpyLlama(demo_checkpoint)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def stream(stub, ids, **kw) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(params=params(**kw))
    req.prompt_token_ids.ids.extend(ids)
    return list(stub.Generate(req))


def test_prompt_logprobs_are_the_reference_models(stub, reference, tokenizer):
    """Chunked prefill (63 + 37): each prompt token's logprob and rank, and the top 5, equal log_softmax of the
    reference logits at the position before it; the sampled tokens are the greedy reference's, as without."""
    messages = stream(stub, PROMPT, max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=5)
    assert [len(m.prompt_logprobs) for m in messages] == [99] + [0] * (len(messages) - 1)
    logits = reference.logits(PROMPT)
    lp = log_softmax(logits[:-1])
    for j, e in enumerate(messages[0].prompt_logprobs):  # about prompt token j + 1, from position j
        tok = PROMPT[j + 1]
        assert e.token_id == tok and e.text == tokenizer.decode([tok])
        assert abs(e.logprob - lp[j, tok]) < 1e-3
        assert e.rank == int((lp[j] >= lp[j, tok]).sum())
        assert [t.token_id for t in e.top] == list(np.argsort(-lp[j], kind="stable")[:5])
        assert np.allclose([t.logprob for t in e.top], np.sort(lp[j])[::-1][:5], atol=1e-3)
        assert [t.rank for t in e.top] == [1, 2, 3, 4, 5]
    ids = [t for m in messages for t in m.token_ids]
    assert ids == generate(stub, ids=PROMPT, max_tokens=4, temperature=0, ignore_eos=True).token_ids
    assert ids[0] == int(logits[-1].argmax())
    # the prompt's blocks were published as usual; a request for prompt logprobs never takes them from the cache
    again = stream(stub, PROMPT, max_tokens=1, temperature=0, prompt_logprobs=0)
    assert again[-1].cached_prompt_tokens == 0
    assert [e.logprob for e in again[0].prompt_logprobs] == [e.logprob for e in messages[0].prompt_logprobs]
    assert all(not e.top for e in again[0].prompt_logprobs)
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


def test_n_samples_get_them_once(stub):
    prompt = PROMPT[:40]  # one 1x64 chunk
    messages = stream(stub, prompt, max_tokens=3, temperature=1.0, seed=3, n=2, ignore_eos=True, prompt_logprobs=1)
    with_plp = [(m.index, len(m.prompt_logprobs)) for m in messages if m.prompt_logprobs]
    assert with_plp == [(0, 39)]
    last = {m.index: m for m in messages if m.finish_reason}
    assert last[0].cached_prompt_tokens == 0 and last[1].cached_prompt_tokens == 32  # sample 1 shares its blocks


def test_out_of_range_is_refused_naming_the_field(stub):
    with pytest.raises(grpc.RpcError) as err:
        stream(stub, [1, 2, 3], prompt_logprobs=21)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_logprobs" in err.value.details()
