"""End to end through the generated stubs: a real worker process and a real scheduler process on loopback."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import sentencepiece as spm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.auth import worker_channel
from tinyvllm.v1 import scheduler_pb2 as pb

PROMPTS = [
    "Once upon a time", "The dragon in one story", "Questions and answers:", "The river ran from",
    "A fisherman named Tomás", "In the café by the harbour", "Prices were written in", "The quick brown fox",
    "Continuous batching means", "A paged cache stores", "Children played in the park", "The library opened",
    "An old clock in the hall", "Good software is small", "The weather today is", "The end of one story",
]


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: int = 0
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    messages: int = 0


def params(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


def collect(responses) -> Result:
    r = Result()
    for msg in responses:
        r.messages += 1
        r.token_ids += list(msg.token_ids)
        r.text += msg.text
        if msg.finish_reason:
            r.finish, r.stop_reason = msg.finish_reason, msg.stop_reason
            r.prompt_tokens, r.completion_tokens = msg.prompt_tokens, msg.completion_tokens
            r.cached_prompt_tokens = msg.cached_prompt_tokens
    return r


def generate(stub, prompt=None, ids=None, **kw) -> Result:
    req = pb.GenerateRequest(params=params(**kw))
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    else:
        req.prompt = prompt
    return collect(stub.Generate(req))


async def agenerate(stub, prompt: str, **kw) -> Result:
    r = Result()
    async for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, params=params(**kw))):
        r.token_ids += list(msg.token_ids)
        r.text += msg.text
        if msg.finish_reason:
            r.finish, r.stop_reason = msg.finish_reason, msg.stop_reason
            r.completion_tokens = msg.completion_tokens
    return r


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(demo_checkpoint / "tokenizer.model"))


def wait_idle(stub, timeout_s: float = 30.0) -> pb.ServerInfo:
    """Blocks are returned when the engine processes the end of a request, just after the last message."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        if (info.running_requests == 0 and info.waiting_requests == 0 and info.free_kv_blocks == info.total_kv_blocks) \
                or time.monotonic() > deadline:
            return info


# ---- serving basics -----------------------------------------------------------------------------------------------
def test_health_and_reflection(services):
    for name in ("worker", "scheduler"):
        with grpc.insecure_channel(services[name].address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in reply.list_services_response.service}
            assert "grpc.health.v1.Health" in names
            assert ("tinyvllm.v1.Scheduler" if name == "scheduler" else "tinyvllm.v1.Worker") in names


def test_server_info(stub, demo_checkpoint):
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model_name == demo_checkpoint.name
    assert info.device == "CPU"
    assert info.block_size == 16 and info.max_context == 256
    assert info.total_kv_blocks == 40 and info.vocab_size > 0
    assert list(info.decode_batch_sizes) == [1, 2, 4, 8, 16]


def test_prompt_text_gets_bos_and_length_finish(stub, tokenizer):
    r = generate(stub, "Once upon a time", max_tokens=12, temperature=0)
    assert r.prompt_tokens == 1 + len(tokenizer.encode("Once upon a time"))
    assert r.finish == pb.FINISH_REASON_LENGTH and len(r.token_ids) == r.completion_tokens == 12
    same = generate(stub, ids=[1, *tokenizer.encode("Once upon a time")], max_tokens=12, temperature=0)
    assert same.token_ids == r.token_ids


def test_streamed_text_is_the_decode_of_all_ids(stub, tokenizer):
    for prompt in PROMPTS[:4]:
        r = generate(stub, prompt, max_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
        prompt_ids = [1, *tokenizer.encode(prompt)]
        full, head = tokenizer.decode(prompt_ids + r.token_ids), tokenizer.decode(prompt_ids)
        assert full.startswith(head)
        assert r.text == full[len(head):]
        assert r.messages > 2  # streamed, not returned at the end


def test_default_max_tokens_is_16(stub):
    r = generate(stub, "Once upon a time", temperature=0, ignore_eos=True)
    assert r.completion_tokens == 16 and r.finish == pb.FINISH_REASON_LENGTH


# ---- batching ------------------------------------------------------------------------------------------------------
async def test_concurrent_greedy_equals_sequential(aio_stub, stub):
    """16 at once share decode batches (and, with 40 KV blocks, preempt each other) yet match one at a time."""
    kw = dict(max_tokens=48, temperature=0, ignore_eos=True)
    sequential = [await agenerate(aio_stub, p, **kw) for p in PROMPTS]
    concurrent = await asyncio.gather(*(agenerate(aio_stub, p, **kw) for p in PROMPTS))
    for p, one, many in zip(PROMPTS, sequential, concurrent):
        assert many.token_ids == one.token_ids, p
        assert many.text == one.text
        assert len(one.token_ids) == 48
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


async def test_seeded_sampling_is_reproducible_whatever_the_batch(aio_stub):
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = await agenerate(aio_stub, "The dragon in one story", **kw)
    again = await agenerate(aio_stub, "The dragon in one story", **kw)
    crowd = await asyncio.gather(
        agenerate(aio_stub, "The dragon in one story", **kw),
        *(agenerate(aio_stub, p, max_tokens=30, temperature=1.0, ignore_eos=True) for p in PROMPTS[:6]))
    assert alone.token_ids == again.token_ids == crowd[0].token_ids
    other_seed = await agenerate(aio_stub, "The dragon in one story", **{**kw, "seed": 99})
    assert other_seed.token_ids != alone.token_ids


async def test_the_whole_64_bit_seed_counts(aio_stub):
    """Seeds 2**32 + 1 and 2**64 - 1 were folded to 32 bits and sampled exactly what seeds 0 and 1 sample."""
    kw = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    outs = {seed: (await agenerate(aio_stub, "The dragon in one story", seed=seed, **kw)).token_ids
            for seed in (0, 1, 2 ** 32 + 1, 2 ** 64 - 1)}
    assert len({tuple(ids) for ids in outs.values()}) == 4
    again = await agenerate(aio_stub, "The dragon in one story", seed=2 ** 64 - 1, **kw)
    assert again.token_ids == outs[2 ** 64 - 1]


def test_unseeded_sampling_varies(stub):
    outs = {tuple(generate(stub, "The river ran from", max_tokens=16, temperature=1.0, ignore_eos=True).token_ids)
            for _ in range(3)}
    assert len(outs) > 1


def test_top_k_one_is_greedy(stub):
    greedy = generate(stub, "A paged cache stores", max_tokens=16, temperature=0, ignore_eos=True)
    topk1 = generate(stub, "A paged cache stores", max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True)
    assert topk1.token_ids == greedy.token_ids


# ---- stopping ------------------------------------------------------------------------------------------------------
def test_stop_token_ids(stub):
    base = generate(stub, "Good software is small", max_tokens=30, temperature=0, ignore_eos=True)
    stop_id = base.token_ids[9]
    first = base.token_ids.index(stop_id)
    r = generate(stub, "Good software is small", max_tokens=30, temperature=0, ignore_eos=True,
                 stop_token_ids=[stop_id])
    assert r.finish == pb.FINISH_REASON_STOP and r.stop_reason == str(stop_id)
    assert r.token_ids == base.token_ids[:first + 1]


def test_stop_strings_are_cut_and_never_streamed(stub):
    base = generate(stub, "The quick brown fox", max_tokens=40, temperature=0, ignore_eos=True)
    text = base.text
    assert len(text) > 12
    stop = text[8:11]  # a stop string from the middle of the greedy output
    first = text.index(stop)
    r = generate(stub, "The quick brown fox", max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    assert r.finish == pb.FINISH_REASON_STOP and r.stop_reason == stop
    assert r.text == text[:first]
    assert stop not in r.text
    assert r.token_ids == base.token_ids[:len(r.token_ids)] and len(r.token_ids) < len(base.token_ids)


def test_eos_stops_unless_ignored(stub):
    """With stop_token_ids naming EOS's twin we can't force the random model to emit EOS; min_tokens covers it."""
    r = generate(stub, "Once upon a time", max_tokens=20, temperature=0, min_tokens=20, stop_token_ids=[3])
    assert r.completion_tokens == 20


# ---- bad input and cancellation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_kw, message", [
    (dict(), "exactly one of prompt"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[])), "empty"),
    (dict(prompt="hi", params=params(max_tokens=0)), "max_tokens"),
    (dict(prompt="hi", params=params(temperature=-1)), "temperature"),
    (dict(prompt="hi", params=params(top_p=0)), "top_p"),
    (dict(prompt="hi", params=params(top_k=-5)), "top_k"),
    (dict(prompt="hi", params=params(stop=[""])), "stop"),
    (dict(prompt="hi", params=params(stop_token_ids=[10 ** 6])), "stop_token_ids"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1, 10 ** 6])), "prompt_token_ids"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1] * 300)), "at most"),
])
def test_bad_requests_get_invalid_argument(stub, request_kw, message):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**request_kw)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_duplicate_running_request_id(stub):
    first = stub.Generate(pb.GenerateRequest(request_id="dup", prompt="hi", params=params(max_tokens=200, ignore_eos=True)))
    assert next(first).request_id == "dup"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(request_id="dup", prompt="hi")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


def test_cancelled_request_frees_its_blocks_and_others_finish(stub):
    long = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=params(max_tokens=200, ignore_eos=True)))
    next(long)
    survivor = generate(stub, "The library opened", max_tokens=20, temperature=0, ignore_eos=True)
    long.cancel()
    assert survivor.finish == pb.FINISH_REASON_LENGTH and len(survivor.token_ids) == 20
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


def test_request_to_the_worker_with_a_wrong_shape_is_refused(services):
    from tinyvllm.v1 import worker_pb2, worker_pb2_grpc

    with worker_channel(services["worker"].address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        me = info.instance_id
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(worker_pb2.ExecuteRequest(rows=3, tokens=1, num_steps=1, instance_id=me))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a bucket" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # right bucket, arrays of the wrong size
            stub.Execute(worker_pb2.ExecuteRequest(rows=1, tokens=1, num_steps=1, token_ids=b"\0" * 8, instance_id=me))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_temperature = worker_pb2.ExecuteRequest(
            rows=1, tokens=1, num_steps=1, instance_id=me, token_ids=b"\0" * 4, positions=b"\0" * 4,
            chunk_lens=np.array([1], np.int32).tobytes(), block_tables=b"\0" * 4 * info.block_table_width,
            temperature=np.array([np.nan], np.float32).tobytes(), top_p=np.array([1], np.float32).tobytes(),
            top_k=b"\0" * 4, seeds=b"\0" * 4, counters=b"\0" * 4)
        with pytest.raises(grpc.RpcError) as err:  # every value is checked, sampling values too
            stub.Execute(bad_temperature)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # a caller that does not know this worker instance
            stub.Execute(worker_pb2.ExecuteRequest(rows=1, tokens=1, num_steps=1, instance_id="another"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.num_kv_blocks == 41


def test_prefix_sharing_reuses_blocks_and_keeps_outputs(stub, tokenizer):
    """A long shared prefix is found in the cache; outputs stay identical to a cold run."""
    prefix = "Once upon a time there was a small server that wanted to answer every question quickly. " * 2
    cold = generate(stub, prefix + "It lived", max_tokens=10, temperature=0, ignore_eos=True)
    warm = generate(stub, prefix + "It lived", max_tokens=10, temperature=0, ignore_eos=True)
    assert warm.token_ids == cold.token_ids
    assert warm.cached_prompt_tokens >= 16 * ((warm.prompt_tokens - 1) // 16) - 16 > 0
    other = generate(stub, "Something else entirely, not sharing the prefix", max_tokens=4, temperature=0)
    assert other.cached_prompt_tokens == 0
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


def test_cache_salt_keeps_tenants_out_of_each_others_prefix_cache(stub):
    """A prompt cached under one salt is a miss under another salt or none (a tenant cannot probe others' prompts
    through cached_prompt_tokens or latency), a hit under the same salt; outputs are the same either way."""
    prompt = "A tenant's secret prompt, long enough to fill more than one block of sixteen tokens. " * 2

    def run(salt: str) -> Result:
        return collect(stub.Generate(pb.GenerateRequest(prompt=prompt, cache_salt=salt, params=params(
            max_tokens=4, temperature=0, ignore_eos=True))))

    first = run("tenant-a")
    probes = [run("tenant-b"), run("")]
    assert [p.cached_prompt_tokens for p in probes] == [0, 0]
    again = run("tenant-a")
    assert again.cached_prompt_tokens >= 16
    assert all(r.token_ids == first.token_ids for r in (*probes, again))


def test_the_worker_serves_only_callers_with_its_secret(services):
    """Any local process could otherwise overwrite other clients' KV blocks through Execute."""
    from tinyvllm.v1 import worker_pb2, worker_pb2_grpc

    for channel in (grpc.insecure_channel(services["worker"].address),
                    worker_channel(services["worker"].address, secret="not-the-secret")):
        with channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for call, request in ((stub.GetWorkerInfo, worker_pb2.GetWorkerInfoRequest()),
                                  (stub.Execute, worker_pb2.ExecuteRequest(rows=1, tokens=1, num_steps=1))):
                with pytest.raises(grpc.RpcError) as err:
                    call(request)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
