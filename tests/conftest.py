"""Shared fixtures: a demo checkpoint made by the tests, and one worker + scheduler pair for all integration tests.

The pair is started once per session: on DEV=CPU every new kernel shape is compiled with clang, so graph capture
is the slowest part of the suite and is paid once."""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEV", "CPU")
# the worker secret of the services the tests start (shared/auth.py): a file of this run, not ~/.cache's
os.environ.setdefault("TINYVLLM_WORKER_SECRET_FILE", os.path.join(tempfile.mkdtemp(prefix="tinyvllm-"), "secret"))
from worker_svc.compat import configure_environment  # noqa: E402  (before tinygrad is imported)

configure_environment()

from shared.demo_checkpoint import build_checkpoint  # noqa: E402
from shared.processes import start_services  # noqa: E402

# small buckets keep CPU compile time down; few KV blocks make 16 concurrent requests preempt each other
WORKER_FLAGS = ["--decode-batch-sizes", "1,2,4,8,16", "--prefill-shapes", "1x16,4x16,1x64", "--max-steps", "4",
                "--kv-blocks", "41", "--max-context", "256"]


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A fp32 demo Llama (GQA, untied head) in the Hugging Face layout, with a trained SentencePiece tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp("demo-fp32"), shape="demo", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def services(demo_checkpoint, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    worker, scheduler = start_services(demo_checkpoint, log_dir, WORKER_FLAGS)
    yield {"worker": worker, "scheduler": scheduler, "log_dir": log_dir}
    scheduler.stop()
    worker.stop()


@pytest.fixture(scope="session")
def scheduler_address(services) -> str:
    return services["scheduler"].address


@pytest.fixture
def stub(scheduler_address):
    from tinyvllm.v1 import scheduler_pb2_grpc

    with grpc.insecure_channel(scheduler_address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


@pytest.fixture
async def aio_stub(scheduler_address):
    from tinyvllm.v1 import scheduler_pb2_grpc

    async with grpc.aio.insecure_channel(scheduler_address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)
