"""Property-based fuzzing (hypothesis), bounded for CI: any GenerateRequest gets a clean stream or a clean gRPC
error from the scheduler, and any ExecuteRequest from a caller with the worker's secret gets a result or a clean
refusal; both services stay healthy and a stream running meanwhile is exact."""
from __future__ import annotations

import threading

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.auth import worker_channel
from tests.test_integration import collect, generate, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import worker_pb2, worker_pb2_grpc

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VOCAB = 512  # about the demo model's; ids beyond it must be refused, not crash anything
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)

sampling_params = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(0, 8), "temperature": floats, "top_p": floats, "top_k": st.integers(-3, 2 ** 31 - 1),
    "seed": st.integers(0, 2 ** 64 - 1), "stop": st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 10)})


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=draw(st.text(max_size=8)), cache_salt=draw(st.text(max_size=6)),
                                 params=pb.SamplingParams(**draw(sampling_params)))
    which = draw(st.sampled_from(["text", "ids", "none"]))
    if which == "text":
        request.prompt = draw(st.text(max_size=60))
    elif which == "ids":
        request.prompt_token_ids.ids.extend(draw(st.lists(st.integers(-5, VOCAB + 5), max_size=40)))
    return request


class Background:
    """A long greedy stream that runs while the fuzzing goes on; it must come out exactly as it does alone."""

    def __init__(self, stub, **kw):
        self.kw, self.stub = kw, stub
        self.alone = generate(stub, "The quick brown fox", **kw)
        self.result = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        self.result = generate(self.stub, "The quick brown fox", **self.kw)

    def check(self):
        self.thread.join(timeout=120)
        assert self.result is not None and self.result.token_ids == self.alone.token_ids


def assert_healthy(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_fuzzed_generate_requests_get_a_stream_or_a_clean_error(stub, services):
    background = Background(stub, max_tokens=120, temperature=0, ignore_eos=True)

    @FUZZ
    @given(request=generate_requests())
    def one(request):
        try:
            result = collect(stub.Generate(request, timeout=60))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details(), (err.code(), err.details())
            return
        assert result.finish in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert result.completion_tokens == len(result.token_ids) <= (request.params.max_tokens or 16)

    one()
    background.check()
    assert_healthy(services["scheduler"].address)
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


def test_fuzzed_execute_requests_with_the_secret_get_a_result_or_a_clean_refusal(stub, services):
    """Block tables hold only the null block or ids out of range: a valid call may write only where it harms no
    one (a caller with the secret may of course write any block: that is the scheduler's job)."""
    with worker_channel(services["worker"].address) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        info = worker.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        buckets = [(b, 1) for b in info.decode_batch_sizes] + [(s.rows, s.tokens) for s in info.prefill_shapes]
        background = Background(stub, max_tokens=80, temperature=0, ignore_eos=True)
        settled = [0]  # call numbers already used: a call may follow one of them without a 10 s arrival wait

        def array(draw, dtype, n: int, values) -> bytes:
            if draw(st.integers(0, 9)) == 0:  # now and then the wrong size
                return draw(st.binary(max_size=64))
            return np.asarray(draw(st.lists(values, min_size=n, max_size=n)), dtype).tobytes()

        @FUZZ
        @given(data=st.data())
        def one(data):
            draw = data.draw
            B, T = draw(st.sampled_from(buckets + [(3, 1), (0, 0), (1, 7)]))
            W = info.block_table_width
            bad_ids = st.sampled_from([0, 0, 0, -1, info.num_kv_blocks, 2 ** 31 - 1])
            index = draw(st.integers(0, 2 ** 20))
            request = worker_pb2.ExecuteRequest(
                rows=B, tokens=T, num_steps=draw(st.integers(0, info.max_steps_per_call + 1)),
                token_ids=array(draw, np.int32, B * T, st.integers(-2, info.vocab_size + 2)),
                positions=array(draw, np.int32, B, st.integers(-2, info.max_context + 2)),
                chunk_lens=array(draw, np.int32, B, st.integers(-1, T + 1)),
                block_tables=array(draw, np.int32, B * W, bad_ids),
                temperature=array(draw, np.float32, B, floats), top_p=array(draw, np.float32, B, floats),
                top_k=array(draw, np.int32, B, st.integers(-2, 100)),
                seeds=array(draw, np.uint32, B, st.integers(0, 2 ** 32 - 1)),
                counters=array(draw, np.uint32, B, st.integers(0, 2 ** 32 - 1)),
                seeds_high=b"" if draw(st.booleans()) else array(draw, np.uint32, B, st.integers(0, 2 ** 32 - 1)),
                instance_id=draw(st.sampled_from([info.instance_id] * 4 + ["", "another"])),
                call_index=index, previous_call=draw(st.sampled_from(settled[-3:])),
                previous_rows=b"" if draw(st.booleans()) else array(draw, np.int32, B, st.integers(-2, 17)))
            try:
                response = worker.Execute(request, timeout=60)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED,
                                      grpc.StatusCode.FAILED_PRECONDITION), (err.code(), err.details())
                assert err.details()
            else:
                tokens = np.frombuffer(response.token_ids, np.int32)
                assert tokens.size == B * max(1, request.num_steps)
                assert ((tokens >= 0) & (tokens < info.vocab_size)).all()
            finally:
                settled.append(index)

        one()
    background.check()
    for name in ("worker", "scheduler"):
        assert_healthy(services[name].address)
    after = generate(stub, "The quick brown fox", max_tokens=80, temperature=0, ignore_eos=True)
    assert after.token_ids == background.alone.token_ids
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks
