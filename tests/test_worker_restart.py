"""The scheduler is the source of truth: a worker killed mid-generation and restarted is refilled by recomputation,
and the request completes with the tokens it would have had anyway."""
from __future__ import annotations

import grpc

from shared.processes import free_port, start_scheduler, start_worker
from tests.test_integration import collect, generate
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc

SMALL = ["--decode-batch-sizes", "1,2", "--prefill-shapes", "1x16", "--max-steps", "2", "--kv-blocks", "33",
         "--max-context", "256"]


def test_killed_worker_is_refilled_and_the_request_completes(demo_checkpoint, tmp_path):
    port = free_port()
    worker = start_worker(demo_checkpoint, tmp_path, SMALL, port=port)
    scheduler = start_scheduler(worker.address, tmp_path)
    try:
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            kw = dict(max_tokens=220, temperature=0, ignore_eos=True)
            reference = generate(stub, "Once upon a time", **kw)
            stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", params=pb.SamplingParams(**kw)))
            first = next(stream)
            worker.proc.kill()
            worker.proc.wait()
            worker = start_worker(demo_checkpoint, tmp_path, SMALL, port=port)
            rest = collect(stream)
            assert list(first.token_ids) + rest.token_ids == reference.token_ids
            assert rest.finish == pb.FINISH_REASON_LENGTH
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.stats.worker_restarts == 1
            assert info.free_kv_blocks == info.total_kv_blocks
    finally:
        scheduler.stop()
        worker.stop()
