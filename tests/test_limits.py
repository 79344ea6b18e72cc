"""Overload is refused at once with RESOURCE_EXHAUSTED and a message, and never stops the server: oversized
requests (gRPC's message limit) and a full waiting queue or too many open streams (scheduler flags), over gRPC
and HTTP (429)."""
from __future__ import annotations

import grpc
import openai
import pytest

from shared.processes import start_scheduler
from tests.test_integration import generate
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc


def test_an_oversized_request_is_refused_and_serving_goes_on(stub):
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, "x" * (5 * 2**20), max_tokens=1)  # over the 4 MB default of --max-request-mb
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ids = generate(stub, ids=[1] + [5] * 20, max_tokens=2, temperature=0)
    assert len(ids.token_ids) == 2


@pytest.mark.parametrize("flag", ["--max-waiting", "--max-streams"])
def test_limits_refuse_at_once_with_a_message(services, demo_checkpoint, tmp_path, flag):
    """A second scheduler whose limit is 0 refuses every request before it reaches the worker (so it never writes
    into the KV pool that the session's scheduler uses)."""
    scheduler = start_scheduler(services["worker"].address, tmp_path, extra=[flag, "0"])
    try:
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                generate(stub, "Once upon a time", max_tokens=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and flag in err.value.details()
            assert stub.GetServerInfo(pb.GetServerInfoRequest()).running_requests == 0
        # the HTTP API goes through the same check: 429 with the same message, in OpenAI's error shape
        http = openai.OpenAI(base_url=f"{scheduler.http_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError, match=flag):
            http.completions.create(model=demo_checkpoint.name, prompt="Once upon a time", max_tokens=4)
    finally:
        scheduler.stop()
