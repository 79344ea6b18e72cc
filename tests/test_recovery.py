"""Correct under failure, on a worker with a KV pool of 8 blocks: preemption by recompute and worker restarts
(mid-call and while idle) leave every greedy output exactly what it is with no pressure and no failure."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest

from shared.processes import free_port, start_scheduler, start_services, start_worker
from tests.test_integration import agenerate, collect, generate, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc

# 8 usable blocks of 16 tokens: one sequence of max_context fits alone, two long ones cannot run together
SMALL = ["--decode-batch-sizes", "1,2", "--prefill-shapes", "1x16", "--max-steps", "2", "--kv-blocks", "9",
         "--max-context", "128"]


@pytest.fixture(scope="module")
def small(demo_checkpoint, tmp_path_factory):
    """A worker and scheduler pair; tests that kill the worker put a new one in services["worker"]."""
    log_dir = tmp_path_factory.mktemp("small-pool")
    port = free_port()
    # restarts below take longer than the default --worker-timeout on a loaded CPU: the streams must wait for them
    worker, scheduler = start_services(demo_checkpoint, log_dir, SMALL, worker_port=port,
                                       scheduler_flags=["--worker-timeout", "300"])
    services = {"worker": worker, "scheduler": scheduler, "port": port, "log_dir": log_dir}
    yield services
    services["scheduler"].stop()
    services["worker"].stop()


def restart_worker(small, demo_checkpoint, stop_signal: int = signal.SIGKILL) -> float:
    """Stops the worker with `stop_signal` sent to its whole process group (as systemd and `kill -- -PGID` do),
    starts a new one on the same port; returns the seconds the old one took to exit."""
    proc = small["worker"].proc
    t0 = time.monotonic()
    os.killpg(proc.pid, stop_signal)
    proc.wait(timeout=60)
    took = time.monotonic() - t0
    small["worker"] = start_worker(demo_checkpoint, small["log_dir"], SMALL, port=small["port"])
    return took


@pytest.fixture
def stub(small):
    with grpc.insecure_channel(small["scheduler"].address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


async def test_greedy_output_does_not_depend_on_memory_pressure(small, stub):
    """Eight greedy streams of 60 tokens need 32 blocks together and the pool has 8: they preempt each other
    repeatedly, and each must still produce exactly what it produces alone (a preempted sequence is recomputed,
    never run without its blocks)."""
    prompts = ["Once upon a time", "The dragon in one story", "Questions and answers:", "A river", "In the morning",
               "She said that", "Numbers: one, two", "The end of the road"]
    kw = dict(max_tokens=60, temperature=0, ignore_eos=True)
    alone = [generate(stub, p, **kw) for p in prompts]
    before = stub.GetServerInfo(pb.GetServerInfoRequest()).stats.preemptions
    async with grpc.aio.insecure_channel(small["scheduler"].address) as channel:
        aio_stub = scheduler_pb2_grpc.SchedulerStub(channel)
        together = await asyncio.gather(*(agenerate(aio_stub, p, **kw) for p in prompts))
    for p, one, crowded in zip(prompts, alone, together):
        assert crowded.token_ids == one.token_ids, p
        assert crowded.text == one.text
    info = wait_idle(stub)
    assert info.stats.preemptions - before >= 2
    assert info.free_kv_blocks == info.total_kv_blocks


def test_killed_worker_is_refilled_and_the_request_completes(small, stub, demo_checkpoint):
    kw = dict(max_tokens=100, temperature=0, ignore_eos=True)
    reference = generate(stub, "Once upon a time", **kw)
    restarts = stub.GetServerInfo(pb.GetServerInfoRequest()).stats.worker_restarts
    stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(**kw)))
    first = next(stream)
    restart_worker(small, demo_checkpoint)
    rest = collect(stream)
    assert list(first.token_ids) + rest.token_ids == reference.token_ids
    assert rest.finish == pb.FINISH_REASON_LENGTH
    info = wait_idle(stub)
    assert info.stats.worker_restarts == restarts + 1
    assert info.free_kv_blocks == info.total_kv_blocks


def test_worker_restarted_while_idle_serves_no_stale_prefix_blocks(small, stub, demo_checkpoint):
    """The scheduler's prefix cache describes the old worker's KV contents: the first call to a new instance is
    refused, the cache is forgotten and the prompt recomputed, so the output is the same as before the restart."""
    prompt = "Once upon a time there was a small server that wanted to answer every question quickly."
    kw = dict(max_tokens=12, temperature=0, ignore_eos=True)
    cold = generate(stub, prompt, **kw)
    warm = generate(stub, prompt, **kw)
    assert warm.cached_prompt_tokens >= 16 and warm.token_ids == cold.token_ids
    restarts = stub.GetServerInfo(pb.GetServerInfoRequest()).stats.worker_restarts
    # SIGTERM to the process group, compile workers included, ends the worker within seconds (it used to hang)
    assert restart_worker(small, demo_checkpoint, signal.SIGTERM) < 10
    after = generate(stub, prompt, **kw)
    assert after.token_ids == cold.token_ids
    assert after.cached_prompt_tokens == 0  # the cache was forgotten, not read
    info = wait_idle(stub)
    assert info.stats.worker_restarts == restarts + 1
    assert info.free_kv_blocks == info.total_kv_blocks


def test_a_slow_reader_is_aborted_and_nobody_else_waits(small):
    """A client that stops reading: gRPC's flow control stops the stream's writes, its messages pile up in the
    scheduler until --max-stream-buffer, then that request ends with FINISH_REASON_ABORT (it used to run to the
    end, holding every message in memory); another stream finishes meanwhile, exactly as alone."""
    small["scheduler"].stop()  # one scheduler per worker: this one serves the module from now on
    small["scheduler"] = start_scheduler(small["worker"].address, small["log_dir"],
                                         extra=["--max-stream-buffer", "4", "--worker-timeout", "300"])
    address = small["scheduler"].address
    kw = dict(max_tokens=100, temperature=0, ignore_eos=True)
    # a receive window of one byte: the client's transport takes no message the application has not asked for
    slow_options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address, options=slow_options) as slow:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        alone = generate(stub, "The dragon in one story", max_tokens=30, temperature=0, ignore_eos=True)
        reference = generate(stub, "Once upon a time", **kw)
        stream = scheduler_pb2_grpc.SchedulerStub(slow).Generate(
            pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(**kw)), timeout=120)
        first = next(stream)
        other = generate(stub, "The dragon in one story", max_tokens=30, temperature=0, ignore_eos=True)
        assert other.token_ids == alone.token_ids
        info = wait_idle(stub)  # the slow stream's request ended and returned its blocks before its client read
        assert info.running_requests == 0 and info.free_kv_blocks == info.total_kv_blocks
        rest = collect(stream)
        assert rest.finish == pb.FINISH_REASON_ABORT and "--max-stream-buffer" in rest.stop_reason
        got = list(first.token_ids) + rest.token_ids
        assert len(got) < 100 and got == reference.token_ids[:len(got)]


def test_shutdown_refuses_new_requests_and_aborts_streams_after_the_grace(small, demo_checkpoint):
    """Stops the module's scheduler (the next test starts its own): SIGTERM to a scheduler (started with a 0.2 s
    grace) makes new requests UNAVAILABLE (retryable elsewhere) and ends a stream still running after the grace
    with FINISH_REASON_ABORT."""
    scheduler = start_scheduler(small["worker"].address, small["log_dir"], extra=["--shutdown-grace", "0.2"])
    try:
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            small["scheduler"].stop()  # one scheduler per worker: the module's goes first
            stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(
                max_tokens=100, temperature=0, ignore_eos=True)))
            first = next(stream)
            scheduler.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # the signal reaches the scheduler's loop
            refused = httpx.post(f"{scheduler.http_url}/v1/completions", timeout=5,
                                 json={"model": demo_checkpoint.name, "prompt": "The dragon", "max_tokens": 4})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            with pytest.raises(grpc.RpcError) as err:
                generate(stub, "The dragon", max_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = collect(stream)
            assert rest.finish == pb.FINISH_REASON_ABORT and "shutting down" in rest.stop_reason
            assert len(first.token_ids) + len(rest.token_ids) < 100
            assert scheduler.proc.wait(timeout=15) == 0
    finally:
        scheduler.stop()


def test_without_a_worker_streams_end_and_new_requests_are_refused_until_it_returns(small, demo_checkpoint):
    """A worker gone for --worker-timeout: the running stream ends with FINISH_REASON_ABORT and a message (it used
    to wait forever), new requests get UNAVAILABLE, no block is lost; once a worker is back, a request's first
    token follows within seconds; a worker lost while idle is noticed without a request."""
    small["scheduler"].stop()  # one scheduler per worker: this one, with a 2 s bound, serves the module from now on
    small["scheduler"] = start_scheduler(small["worker"].address, small["log_dir"], extra=["--worker-timeout", "2"])
    with grpc.insecure_channel(small["scheduler"].address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(
            max_tokens=100, temperature=0, ignore_eos=True)), timeout=30)  # without the bound it waited forever
        next(stream)
        proc = small["worker"].proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        t0 = time.monotonic()
        rest = collect(stream)
        waited = time.monotonic() - t0
        assert rest.finish == pb.FINISH_REASON_ABORT and "--worker-timeout" in rest.stop_reason
        assert 1.5 < waited < 10
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, "The dragon", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "--worker-timeout" in err.value.details()
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.free_kv_blocks == info.total_kv_blocks and info.running_requests == info.waiting_requests == 0

        small["worker"] = start_worker(demo_checkpoint, small["log_dir"], SMALL, port=small["port"])
        t0 = time.monotonic()
        while True:  # the scheduler may take up to its 1 s reconnect backoff to see the worker
            try:
                stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(
                    max_tokens=4, temperature=0)))
                next(stream)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 10
                time.sleep(0.1)
        first_token_s = time.monotonic() - t0
        collect(stream)
        print(f"first token {first_token_s:.2f} s after the worker served again")
        assert first_token_s < 3
        wait_idle(stub)

        # lost while idle (no call fails to tell): after the bound, a new request is refused at once, not after
        # waiting for the bound itself. Runs last in this module: it leaves no worker behind.
        proc = small["worker"].proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        time.sleep(3)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, "The dragon", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 1
