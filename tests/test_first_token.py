"""The path of a request's first token through the scheduler, against a worker stub that answers on demand: the
first token is streamed before the next call is planned and sent, and a small request is tokenized without a
thread hand-off (a large one still in a thread)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from scheduler_svc import engine as engine_mod
from scheduler_svc import frontend as frontend_mod
from scheduler_svc.frontend import Frontend, Limits
from tinyvllm.v1 import scheduler_pb2 as pb
from shared.llama_config import LlamaConfig
from tinyvllm.v1 import worker_pb2
from worker_svc.tokenizer_files import read_tokenizer_info


class StubWorker:
    """Stands in for Engine._execute: records when each call's task starts (when gRPC would send it) and answers
    a call when the test says so."""

    def __init__(self, events: list):
        self.events = events
        self.answers: list[asyncio.Future] = []

    def __call__(self, request: bytes, **_):
        req = worker_pb2.ExecuteRequest.FromString(request)
        answer = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        index = len(self.answers)

        async def call():
            self.events.append(("sent", index))
            rows, steps = req.rows, req.num_steps or 1
            await answer
            return worker_pb2.ExecuteResponse(token_ids=np.full(rows * steps, 7, np.int32).tobytes())
        return call()


@pytest.fixture
async def served(demo_checkpoint):
    config = LlamaConfig.load(demo_checkpoint)
    tok = read_tokenizer_info(demo_checkpoint, config)
    info = worker_pb2.WorkerInfo(
        model_name="stub", vocab_size=config.vocab_size, max_context=2048, block_size=16, num_kv_blocks=257,
        block_table_width=128, decode_batch_sizes=[1, 2], prefill_shapes=[worker_pb2.PrefillShape(rows=1, tokens=32)],
        max_steps_per_call=4, tokenizer_model=tok.model_bytes, tokenizer_json=tok.json_bytes,
        add_bos_token=tok.add_bos, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, instance_id="stub",
        num_sampling_slots=4)
    events: list = []
    engine = engine_mod.Engine("127.0.0.1:1")

    async def fetch(timeout_s):
        return info
    engine._fetch_worker_info = fetch
    await engine.start()
    engine._watch.cancel()
    stub = StubWorker(events)
    engine._execute = stub
    schedule = engine.scheduler.schedule

    def schedule_recorded():
        batch = schedule()
        if batch is not None:
            events.append(("planned", batch.call_index))
        return batch
    engine.scheduler.schedule = schedule_recorded
    yield Frontend(engine, Limits()), stub, events
    await engine.stop()


def request(max_tokens: int, n_ids: int = 20) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, *range(3, 2 + n_ids)]),
                              params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def test_the_first_token_is_streamed_before_the_next_call_is_planned(served, monkeypatch):
    frontend, stub, events = served
    response = frontend_mod.RequestStream._response

    def recorded(self, delta):
        events.append(("message", len(delta.token_ids)))
        return response(self, delta)
    monkeypatch.setattr(frontend_mod.RequestStream, "_response", recorded)
    stream = await frontend.start(request(max_tokens=8))
    messages = aiter(stream)
    first = asyncio.ensure_future(anext(messages))
    for _ in range(20):
        await asyncio.sleep(0)
    assert [kind for kind, _ in events] == ["planned", "planned", "sent", "sent"], events
    assert len(stub.answers) == 2  # two calls in flight (PIPELINE_DEPTH): the prefill, a decode behind it
    events.clear()
    stub.answers[0].set_result(None)  # the prefill answers
    message = await first
    assert list(message.token_ids) == [7]
    # the first token's message was made (and handed to gRPC) before the next call was planned
    assert [kind for kind, _ in events][:2] == ["message", "planned"], events
    for _ in range(20):
        await asyncio.sleep(0)
    assert ("sent", 3) in events  # and the next call followed
    await messages.aclose()


async def test_a_small_request_is_tokenized_on_the_loop_and_a_large_one_in_a_thread(served, monkeypatch):
    frontend, _, _ = served
    threads: list = []
    to_thread = asyncio.to_thread

    async def recorded(fn, *args):
        threads.append(fn)
        return await to_thread(fn, *args)
    monkeypatch.setattr(frontend_mod.asyncio, "to_thread", recorded)
    small = request(max_tokens=1, n_ids=20)
    assert small.ByteSize() <= frontend_mod.INLINE_REQUEST_BYTES
    (await frontend.start(small)).close()
    assert threads == []
    large = pb.GenerateRequest(prompt="word " * (frontend_mod.INLINE_REQUEST_BYTES // 5 + 1),
                               params=pb.SamplingParams(max_tokens=1))
    assert large.ByteSize() > frontend_mod.INLINE_REQUEST_BYTES
    (await frontend.start(large)).close()
    assert len(threads) == 1
