"""vLLM's sampling parameters through the public API on the shared services: penalties, logit bias, allowed ids
and logprobs against a NumPy forward pass and the same rules in NumPy; seeded runs whatever the batch; every new
field validated."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from tests.reference import NumpyLlama
from tests.test_integration import PROMPTS, agenerate, generate, params, tokenizer, wait_idle  # noqa: F401
from tinyvllm.v1 import scheduler_pb2 as pb

PROMPT_IDS = [1, 300, 301, 302, 303, 304, 305, 306, 300, 301]  # repeats, so the repetition penalty has work


@pytest.fixture(scope="module")
def reference(demo_checkpoint) -> NumpyLlama:
    return NumpyLlama(demo_checkpoint)


def np_greedy_with_penalties(ref: NumpyLlama, prompt: list[int], n: int, rep=1.0, pres=0.0, freq=0.0,
                             bias: dict[int, float] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """vLLM's rules in NumPy on the reference logits: bias, repetition (prompt + output), frequency, presence;
    greedy. Also returns each step's raw log-probabilities."""
    tokens, out, logps = list(prompt), [], []
    for _ in range(n):
        logits = ref.logits(tokens)[-1]
        x = logits - logits.max()
        logps.append(x - np.log(np.exp(x).sum()))
        z = logits.copy()
        for i, b in (bias or {}).items():
            z[i] += b
        counts = np.bincount(out, minlength=len(z))
        seen = counts > 0
        seen[prompt] = True
        z = np.where(seen, np.where(z > 0, z / rep, z * rep), z)
        z = z - freq * counts - pres * (counts > 0)
        tok = int(z.argmax())
        out.append(tok)
        tokens.append(tok)
    return out, logps


def test_penalties_and_bias_match_numpy_end_to_end(stub, reference):
    """Several decode calls of several steps: the counts the graph keeps and updates are the sequence's."""
    kw = dict(repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.9, logit_bias={307: 2.0, 5: -50.0})
    r = generate(stub, ids=PROMPT_IDS, max_tokens=12, temperature=0, ignore_eos=True, **kw)
    want, _ = np_greedy_with_penalties(reference, PROMPT_IDS, 12, rep=1.8, pres=0.7, freq=0.9,
                                       bias={307: 2.0, 5: -50.0})
    assert r.token_ids == want
    plain = generate(stub, ids=PROMPT_IDS, max_tokens=12, temperature=0, ignore_eos=True)
    assert plain.token_ids != r.token_ids  # the penalties did something
    assert wait_idle(stub).free_kv_blocks == stub.GetServerInfo(pb.GetServerInfoRequest()).total_kv_blocks


def test_logprobs_are_the_models_with_ranks_and_text(stub, reference, tokenizer):
    req = pb.GenerateRequest(params=params(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5,
                                           min_p=0.01))
    req.prompt_token_ids.ids.extend(PROMPT_IDS)
    entries, ids = [], []
    for msg in stub.Generate(req):
        assert len(msg.logprobs) == len(msg.token_ids)
        entries += list(msg.logprobs)
        ids += list(msg.token_ids)
    _, logps = np_greedy_with_penalties(reference, PROMPT_IDS, 6)
    for tok, e, lp in zip(ids, entries, logps):
        assert e.token_id == tok and e.rank == 1  # greedy: the most likely token
        assert abs(e.logprob - lp[tok]) < 1e-3
        assert [t.token_id for t in e.top] == list(np.argsort(-lp, kind="stable")[:5])
        assert np.allclose([t.logprob for t in e.top], np.sort(lp)[::-1][:5], atol=1e-3)
        assert [t.rank for t in e.top] == [1, 2, 3, 4, 5]
        assert e.top[0].text == e.text == tokenizer.decode([tok])


def test_allowed_token_ids_bound_sampling(stub):
    allowed = [300, 311, 352, 57]
    r = generate(stub, "Once upon a time", max_tokens=20, temperature=1.0, ignore_eos=True,
                 allowed_token_ids=allowed, logprobs=0)
    assert set(r.token_ids) <= set(allowed) and len(r.token_ids) == 20


async def test_seeded_penalised_run_is_reproducible_whatever_the_batch(aio_stub):
    kw = dict(max_tokens=16, temperature=0.9, seed=77, ignore_eos=True, repetition_penalty=1.3,
              frequency_penalty=0.5, min_p=0.05, logit_bias={300: 1.5})
    alone = await agenerate(aio_stub, "The dragon in one story", **kw)
    crowd = await asyncio.gather(
        agenerate(aio_stub, "The dragon in one story", **kw),
        *(agenerate(aio_stub, p, max_tokens=20, temperature=1.0, ignore_eos=True, presence_penalty=1.0)
          for p in PROMPTS[:5]),
        *(agenerate(aio_stub, p, max_tokens=20, temperature=0.7, ignore_eos=True) for p in PROMPTS[5:8]))
    assert crowd[0].token_ids == alone.token_ids


@pytest.mark.parametrize("kw, field", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(logit_bias={10 ** 6: 1.0}), "logit_bias"), (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(n=0), "n must"), (dict(n=65), "n must"),
    (dict(top_p=1.5), "top_p"),
])
def test_new_fields_are_validated(stub, kw, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", params=params(**kw))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_server_info_reports_the_prefix_cache_and_kv_usage(stub):
    prefix = "A paged cache stores blocks of keys and values for every sequence that runs in the server. " * 2
    before = stub.GetServerInfo(pb.GetServerInfoRequest())
    generate(stub, prefix + "One", max_tokens=2, temperature=0)
    generate(stub, prefix + "Two", max_tokens=2, temperature=0)
    info = wait_idle(stub)
    assert info.stats.prefix_cache_queries > before.stats.prefix_cache_queries
    assert info.stats.prefix_cache_hits >= before.stats.prefix_cache_hits + 16
    assert 0 < info.prefix_cache_hit_rate <= 1
    assert info.kv_cache_usage == 0.0  # idle: cached blocks are free blocks


# ---- n samples, chunked prefill -------------------------------------------------------------------------------------
LONG_PROMPT = [1] + [(7 * i) % 350 + 20 for i in range(39)]  # 40 tokens: 2 full blocks of 16 and a partial one


def test_n_samples_share_the_prompt_blocks_and_each_is_its_seed_alone(stub):
    kw = dict(max_tokens=10, temperature=1.0, ignore_eos=True)
    req = pb.GenerateRequest(params=params(n=3, seed=500, **kw))
    req.prompt_token_ids.ids.extend(LONG_PROMPT)
    by_index: dict[int, list[int]] = {0: [], 1: [], 2: []}
    cached = {}
    for msg in stub.Generate(req):
        by_index[msg.index] += list(msg.token_ids)
        if msg.finish_reason:
            cached[msg.index] = msg.cached_prompt_tokens
    assert cached[1] == cached[2] == 32  # the later samples found the first one's full prompt blocks
    for i in range(3):
        alone = generate(stub, ids=LONG_PROMPT, seed=500 + i, **kw)
        assert by_index[i] == alone.token_ids, i
    assert len({tuple(v) for v in by_index.values()}) == 3
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks  # every reference returned


def test_chunked_prefill_equals_one_chunk_and_the_reference(stub, reference):
    """100 prompt tokens run as chunks of 64 and 36, then again with 96 of them found in the prefix cache (one
    chunk of 4): both equal the NumPy model's greedy continuation."""
    prompt = [1] + [(11 * i) % 380 + 10 for i in range(99)]
    first = generate(stub, ids=prompt, max_tokens=6, temperature=0, ignore_eos=True)
    again = generate(stub, ids=prompt, max_tokens=6, temperature=0, ignore_eos=True)  # prefix cache: other chunks
    assert again.cached_prompt_tokens == 96
    want, _ = np_greedy_with_penalties(reference, prompt, 6)
    assert first.token_ids == again.token_ids == want


def test_min_tokens_keeps_stop_ids_from_being_sampled_on_the_device(stub):
    """EOS biased far above everything: it is masked on the device for the first min_tokens tokens (which are
    then the unbiased greedy ones), then sampled at once, as in vLLM."""
    plain = generate(stub, ids=PROMPT_IDS, max_tokens=5, temperature=0, ignore_eos=True).token_ids
    assert 2 not in plain
    r = generate(stub, ids=PROMPT_IDS, max_tokens=12, temperature=0, min_tokens=5, logit_bias={2: 100.0})
    assert r.token_ids == plain + [2] and r.finish == pb.FINISH_REASON_STOP
    r = generate(stub, ids=PROMPT_IDS, max_tokens=12, temperature=0, min_tokens=3, ignore_eos=True,
                 stop_token_ids=[7], logit_bias={7: 100.0})  # a stop id likewise
    assert r.token_ids == plain[:3] + [7] and r.stop_reason == "7"


# ---- priority ----------------------------------------------------------------------------------------------------
async def test_an_urgent_arrival_preempts_a_full_batch_of_lower_priority(aio_stub, stub):
    """Every one of the 16 rows runs a priority-5 request: a priority-0 arrival takes the row of the latest one at
    once (vLLM's priority preemption) and finishes long before the others, and the one it preempted still
    streams exactly its greedy run alone."""
    kw = dict(max_tokens=25, temperature=0, ignore_eos=True)  # 16 x 2 blocks of the 40: only rows are short
    done: dict[str, float] = {}

    async def run(name: str, prompt: str, priority: int, max_tokens: int = 25):
        req = pb.GenerateRequest(prompt=prompt, params=params(**{**kw, "max_tokens": max_tokens}), priority=priority)
        ids = [tok async for msg in aio_stub.Generate(req) for tok in msg.token_ids]
        done[name] = time.monotonic()
        return ids

    before = stub.GetServerInfo(pb.GetServerInfoRequest()).stats.preemptions
    low = [asyncio.ensure_future(run(f"low{i}", p, 5)) for i, p in enumerate(PROMPTS)]
    deadline = time.monotonic() + 30
    while stub.GetServerInfo(pb.GetServerInfoRequest()).running_requests < 16 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    urgent = await run("urgent", "The urgent one", 0, max_tokens=4)
    preempted = stub.GetServerInfo(pb.GetServerInfoRequest()).stats.preemptions - before
    lows = await asyncio.gather(*low)
    assert len(urgent) == 4 and done["urgent"] < min(t for name, t in done.items() if name != "urgent")
    assert preempted >= 1
    assert lows[-1] == generate(stub, PROMPTS[-1], **kw).token_ids  # the latest arrival was the one preempted
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks
