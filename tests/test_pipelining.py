"""Pipelined worker calls, end to end on a worker allowed 16 decode steps per call (as the benchmark runs it): the
worker runs numbered calls in order and feeds a row's last sampled token into the next call on the device."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from shared.processes import start_scheduler, start_worker
from tinyvllm.v1 import scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

LONG_CALLS = ["--decode-batch-sizes", "1,2,4", "--prefill-shapes", "1x16", "--max-steps", "16", "--kv-blocks", "41",
              "--max-context", "256"]


@pytest.fixture(scope="module")
def long_calls(demo_checkpoint, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("long-calls")
    worker = start_worker(demo_checkpoint, log_dir, LONG_CALLS)
    try:
        scheduler = start_scheduler(worker.address, log_dir)
    except Exception:
        worker.stop()
        raise
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
    with grpc.insecure_channel(long_calls["worker"].address) as channel:
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
