"""Pipelined worker calls, end to end on a worker allowed 16 decode steps per call (as the benchmark runs it): the
worker runs numbered calls in order and feeds a row's last sampled token into the next call on the device, a new
request joins a long stream within a few decode steps, streams get tokens every few steps, and outputs are those
of the same requests run one at a time."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from shared.auth import worker_channel
from shared.processes import start_services
from tests.test_integration import PROMPTS, generate, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

LONG_CALLS = ["--decode-batch-sizes", "1,2,4", "--prefill-shapes", "1x16", "--max-steps", "16", "--kv-blocks", "41",
              "--max-context", "256"]


@pytest.fixture(scope="module")
def long_calls(demo_checkpoint, tmp_path_factory):
    worker, scheduler = start_services(demo_checkpoint, tmp_path_factory.mktemp("long-calls"), LONG_CALLS)
    yield {"worker": worker, "scheduler": scheduler}
    scheduler.stop()
    worker.stop()


@pytest.fixture
def stub(long_calls):
    with grpc.insecure_channel(long_calls["scheduler"].address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


# ---- the worker's side of the contract ------------------------------------------------------------------------------
def decode_call(info, token: int, position: int, steps: int, index: int = 0, previous: int = 0,
                prev_row: int | None = None) -> worker_pb2.ExecuteRequest:
    """One greedy row in the 1-row bucket whose block table is all null blocks: it writes and reads only the null
    block, never a block the scheduler owns, and with one row nothing else writes there."""
    one = lambda value, dtype: np.array([value], dtype).tobytes()  # noqa: E731
    return worker_pb2.ExecuteRequest(
        rows=1, tokens=1, num_steps=steps, token_ids=one(token, np.int32), positions=one(position, np.int32),
        chunk_lens=one(1, np.int32), block_tables=np.zeros(info.block_table_width, np.int32).tobytes(),
        temperature=one(0, np.float32), top_p=one(1, np.float32), top_k=one(0, np.int32), seeds=one(0, np.uint32),
        counters=one(position, np.uint32), instance_id=info.instance_id, call_index=index, previous_call=previous,
        previous_rows=b"" if prev_row is None else one(prev_row, np.int32))


def tokens_of(response: worker_pb2.ExecuteResponse) -> list[int]:
    return np.frombuffer(response.token_ids, np.int32).tolist()


def test_worker_runs_numbered_calls_in_order_and_feeds_tokens_forward(long_calls):
    """Calls that continue a row of the previous call (its last token never leaves the device) sample what one
    multi-step call samples; a call that arrives before the call it follows waits for it; a call naming a call the
    worker did not run last is refused with ABORTED and runs nothing."""
    with worker_channel(long_calls["worker"].address) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        info = worker.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        reference = tokens_of(worker.Execute(decode_call(info, token=7, position=0, steps=8)))
        assert len(reference) == 8

        base = 1_000_000 + int(time.time())  # numbers no scheduler of this worker has used
        first = tokens_of(worker.Execute(decode_call(info, 7, 0, 2, index=base)))
        second = tokens_of(worker.Execute(decode_call(info, 0, 2, 2, index=base + 1, previous=base, prev_row=0)))
        assert first + second == reference[:4]

        with pytest.raises(grpc.RpcError) as err:  # base ran, but base + 1 ran after it
            worker.Execute(decode_call(info, 0, 4, 2, index=base + 2, previous=base, prev_row=0))
        assert err.value.code() == grpc.StatusCode.ABORTED and f"follows call {base}" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # follows the refused call: refused at once
            worker.Execute(decode_call(info, 0, 4, 2, index=base + 3, previous=base + 2, prev_row=0))
        assert err.value.code() == grpc.StatusCode.ABORTED

        # sent first, the later call waits until the call it follows has run, then continues its row
        later = worker.Execute.future(decode_call(info, 0, 6, 2, index=base + 5, previous=base + 4, prev_row=0))
        time.sleep(0.5)
        assert not later.done()
        third = tokens_of(worker.Execute(decode_call(info, 0, 4, 2, index=base + 4, previous=base + 1, prev_row=0)))
        assert third + tokens_of(later.result(timeout=60)) == reference[4:]

        with pytest.raises(grpc.RpcError) as err:  # rows of a previous call, but none named
            worker.Execute(decode_call(info, 0, 0, 1, prev_row=0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "previous_call" in err.value.details()


def test_a_refused_call_is_resent_with_token_ids(long_calls, stub):
    """Another client's call runs between two of the scheduler's pipelined calls: the next one, which continues rows
    of the call before it, is refused (ABORTED); the scheduler drops the calls it had planned on it and resends
    with real token ids, and the stream's output is unchanged."""
    kw = dict(max_tokens=60, temperature=0, ignore_eos=True)
    reference = generate(stub, PROMPTS[2], **kw)
    log = long_calls["scheduler"].log_path
    refusals_before = log.read_text().count("worker refused call")
    stream = Stream(stub, PROMPTS[2], **kw)
    with worker_channel(long_calls["worker"].address) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        info = worker.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        while stream.received < 10:
            time.sleep(0.001)
        for _ in range(3):  # unnumbered, null block only: it touches nothing the scheduler owns
            worker.Execute(decode_call(info, token=7, position=0, steps=1))
    assert stream.join().tokens == reference.token_ids and stream.finish == pb.FINISH_REASON_LENGTH
    assert log.read_text().count("worker refused call") > refusals_before
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


# ---- through the scheduler ------------------------------------------------------------------------------------------
class Stream:
    """Reads one Generate stream in a thread, keeping each message's token count."""

    def __init__(self, stub, prompt: str, **kw):
        self.call = stub.Generate(pb.GenerateRequest(prompt=prompt, params=pb.SamplingParams(**kw)))
        self.sizes: list[int] = []
        self.tokens: list[int] = []
        self.finish = 0
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                if msg.token_ids:
                    self.sizes.append(len(msg.token_ids))
                    self.tokens += msg.token_ids
                    self.first.set()
                self.finish = msg.finish_reason or self.finish
        except grpc.RpcError as exc:  # the test cancels the long stream
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    @property
    def received(self) -> int:
        return len(self.tokens)

    def join(self, timeout: float = 120) -> "Stream":
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self


def test_a_request_joins_a_long_stream_within_a_few_decode_steps(stub):
    """Today's worker may run 16 steps per call; a request that arrives while a stream decodes must not wait for
    all of them. Counted in decode steps, as the tokens the long stream receives meanwhile: the calls already sent
    (the one running and the one queued, 2 steps each) finish first, so 4; the bound leaves room for a message on
    its way when the request was sent and for a scheduler that sees the request one call late on a busy machine.
    Calls of 16 steps give 16 or more."""
    kw = dict(temperature=0, ignore_eos=True)
    alone = generate(stub, PROMPTS[1], max_tokens=6, **kw)
    betweens = []
    for _ in range(3):  # the long stream's calls are steady (no arrival for a while) before the request comes
        long = Stream(stub, PROMPTS[0], max_tokens=200, **kw)
        while long.received < 24:
            time.sleep(0.001)
        at_submit = long.received
        short = Stream(stub, PROMPTS[1], max_tokens=6, **kw)
        assert short.first.wait(60)
        betweens.append(long.received - at_submit)
        assert short.join().tokens == alone.token_ids
        long.call.cancel()
        long.join()
        assert max(long.sizes) <= 4  # streamed every few steps, not every 16
    # the best of three tries (a loaded 2-core machine delays a try by a few steps: 9-14 seen); never 16 calls' worth
    assert min(betweens) <= 8 and max(betweens) < 16, betweens
    wait_idle(stub)


async def test_pipelined_outputs_equal_one_at_a_time(long_calls, stub):
    """Requests that arrive one after another join and leave running batches while calls are in flight (stop
    strings and max_tokens end some mid-call); greedy and seeded outputs equal those of each request alone, and no
    stream message carries more than 4 tokens."""
    requests = []
    for i, prompt in enumerate(PROMPTS[:8]):
        kw = dict(max_tokens=20 + 7 * i, ignore_eos=True)
        kw.update(dict(temperature=0) if i % 2 else dict(temperature=0.8, top_p=0.9, seed=100 + i))
        requests.append((prompt, kw))
    stop = generate(stub, PROMPTS[3], max_tokens=30, temperature=0, ignore_eos=True).text[10:13]
    requests.append((PROMPTS[3], dict(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])))
    alone = [generate(stub, p, **kw) for p, kw in requests]
    assert alone[-1].finish == pb.FINISH_REASON_STOP

    sizes: list[int] = []

    async def staggered(aio_stub, i: int, prompt: str, kw: dict):
        await asyncio.sleep(0.05 * i)
        r = []
        async for msg in aio_stub.Generate(pb.GenerateRequest(prompt=prompt, params=pb.SamplingParams(**kw))):
            r += msg.token_ids
            if msg.token_ids:
                sizes.append(len(msg.token_ids))
        return r

    async with grpc.aio.insecure_channel(long_calls["scheduler"].address) as channel:
        aio_stub = scheduler_pb2_grpc.SchedulerStub(channel)
        together = await asyncio.gather(*(staggered(aio_stub, i, p, kw) for i, (p, kw) in enumerate(requests)))
    for (prompt, _), one, many in zip(requests, alone, together):
        assert many == one.token_ids, prompt
    assert max(sizes) <= 4
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks
