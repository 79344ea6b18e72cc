"""The installed `tinyvllm-client` command, run from a directory outside the repository against the live services:
completions, --chat, one-line errors (no traceback) for bad input and a refused connection; and Ctrl-C in the
middle of a stream, against a scheduler stub that holds its stream open."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from concurrent import futures

import grpc
import pytest

from scheduler_svc.client import escape_controls
from shared.processes import free_port
from tests.test_http_api import chat_request
from tests.test_integration import collect
from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc


@pytest.fixture(scope="module")
def command() -> list[str]:
    path = shutil.which("tinyvllm-client")
    assert path, "tinyvllm-client is not installed: run `make setup` (pip install -e .)"
    return [path]


def client(command, tmp_path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the installed package
    env["COLUMNS"] = "200"  # --help on one line per option
    return subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_describes_every_option_with_defaults(command, tmp_path):
    out = client(command, tmp_path, "--help").stdout
    for option in ("--chat", "--system", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop",
                   "--stop-token-id", "--ignore-eos", "--min-tokens", "--server"):
        assert option in out
    assert "(default: 64)" in out and "(default: 127.0.0.1:50051)" in out


def test_completion_and_chat_from_another_directory(command, tmp_path, scheduler_address, stub):
    r = client(command, tmp_path, "--server", scheduler_address, "--max-tokens", "5", "Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and "FINISH_REASON_LENGTH: " in r.stderr
    assert "5 new tokens" in r.stderr
    r = client(command, tmp_path, "--server", scheduler_address, "--chat", "--system", "Be brief.",
               "--max-tokens", "6", "Hi")
    want = collect(stub.Generate(chat_request([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)))
    assert r.returncode == 0 and r.stdout == escape_controls(want.text)


@pytest.mark.parametrize("args, expected", [
    (["--top-p", "2"], "error: INVALID_ARGUMENT: top_p must be in (0, 1]"),
    (["--server", "127.0.0.1:{port}"], "error: UNAVAILABLE: no scheduler at 127.0.0.1:{port}"),
])
def test_errors_are_one_line(command, tmp_path, scheduler_address, args, expected):
    port = free_port()
    args = [a.format(port=port) for a in args]
    r = client(command, tmp_path, "--server", scheduler_address, *args, "Once upon a time")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected.format(port=port)), r.stderr


class StallingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams one piece of text, then holds the stream open until the client goes away (which it records)."""

    def __init__(self):
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        context.add_callback(self.cancelled.set)
        yield pb.GenerateResponse(text=" there")
        self.cancelled.wait(30)


def default_sigint() -> None:
    """In the child before exec: SIGINT at its default and unblocked, as an interactive shell starts a command. A
    child inherits an ignored SIGINT (the suite run as a background job of a script has one), and Python then
    never raises KeyboardInterrupt: the client ran on through the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_quietly(command, tmp_path):
    """Ctrl-C in the middle of a stream: exit status 130, one line, no traceback, and the call is cancelled (the
    server stops generating). The server holds the stream open, so the signal lands mid-stream whatever the speed of
    a real model's stream."""
    servicer = StallingScheduler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        proc = subprocess.Popen([*command, "--server", f"127.0.0.1:{port}", "Once upon a time"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        assert proc.stdout.read(len("Once upon a time there")) == b"Once upon a time there"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and b"Traceback" not in err and err.strip() == b"[interrupted]", err
        assert servicer.cancelled.wait(10), "the stream was not cancelled"
    finally:
        server.stop(0)


def test_control_characters_are_escaped():
    assert escape_controls("a\x1b[2Jb\n\tc\x07\x9b") == "a\\x1b[2Jb\n\tc\\x07\\x9b"
