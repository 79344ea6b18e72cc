"""The installed `tinyvllm-client` command, run from a directory outside the repository against the live services:
completions, --chat, one-line errors (no traceback) for bad input, a refused connection and Ctrl-C."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from scheduler_svc.client import escape_controls
from shared.processes import free_port
from tests.test_http_api import chat_request
from tests.test_integration import collect
from tinyvllm.v1 import scheduler_pb2 as pb


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


def test_ctrl_c_stops_quietly(command, tmp_path, scheduler_address, stub):
    # The signal goes in while the scheduler reports the request running: the client cannot have had its last
    # token then. (Sent once the first text was printed, it came after the client had printed all 200 tokens in
    # every full suite on 2 cores this session.) A run whose request finished between the check and the signal
    # shows nothing about Ctrl-C, so it is run again
    for _ in range(5):
        proc = subprocess.Popen([*command, "--server", scheduler_address, "--max-tokens", "200", "--ignore-eos",
                                 "Once upon a time"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while stub.GetServerInfo(pb.GetServerInfoRequest()).running_requests == 0 and proc.poll() is None:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert b"Traceback" not in err, err
        if proc.returncode == 0 and b"200 new tokens]" in err:
            continue  # finished before the signal
        assert proc.returncode == 130 and b"[interrupted]" in err, (proc.returncode, err)
        return
    pytest.fail("every request finished before its SIGINT")


def test_control_characters_are_escaped():
    assert escape_controls("a\x1b[2Jb\n\tc\x07\x9b") == "a\\x1b[2Jb\n\tc\\x07\\x9b"
