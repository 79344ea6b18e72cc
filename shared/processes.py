"""Starts the worker and scheduler as subprocesses and waits until they report SERVING.

Used by `make run-demo`, the integration tests and the benchmark, so all three start the services the same way."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.service import FAST_RECONNECT

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log_path: pathlib.Path | None) -> str:
    return log_path.read_text()[-4000:] if log_path else "(see the output above)"


def wait_serving(address: str, proc: subprocess.Popen, log_path: pathlib.Path | None, timeout_s: float,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Polls grpc.health.v1 until SERVING (over TLS with `credentials`); fails early, with the log, if the process
    dies."""
    deadline = time.monotonic() + timeout_s
    with (grpc.secure_channel(address, credentials, options=FAST_RECONNECT) if credentials else
          grpc.insecure_channel(address, options=FAST_RECONNECT)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not serving after {timeout_s}s:\n{_tail(log_path)}")


@dataclass
class Service:
    """One running service process and where it listens."""

    name: str
    address: str
    proc: subprocess.Popen
    log_path: pathlib.Path | None  # None: the process writes to the terminal
    http_url: str = ""  # the scheduler's HTTP API (http://host:port), "" if off or not a scheduler

    @classmethod
    def start(cls, name: str, module: str, args: list[str], log_dir: pathlib.Path | None, port: int | None = None,
              timeout_s: float = 900.0, host: str = "127.0.0.1",
              credentials: grpc.ChannelCredentials | None = None) -> "Service":
        """log_dir None: the process writes to this terminal; credentials: how to reach a TLS service."""
        port = port or free_port()
        log_path = log_dir / f"{name}.log" if log_dir else None
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "DEV": os.environ.get("DEV", "CPU")}
        out = log_path.open("w") if log_path else None
        # a process group of its own: a signal to the group reaches the service and its compile workers only
        proc = subprocess.Popen([sys.executable, "-m", module, "--host", host, "--port", str(port), *args],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        service = cls(name, f"{host}:{port}", proc, log_path)
        try:
            wait_serving(service.address, proc, log_path, timeout_s, credentials)
        except Exception:
            service.stop()
            raise
        return service

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(model_dir: pathlib.Path, log_dir: pathlib.Path | None, extra: list[str],
                 port: int | None = None) -> Service:
    return Service.start("worker", "worker_svc", ["--model", str(model_dir), *extra], log_dir, port=port)


def start_services(model_dir: pathlib.Path, log_dir: pathlib.Path | None, worker_flags: list[str],
                   worker_port: int | None = None, port: int | None = None,
                   http_port: int | None = None, scheduler_flags: list[str] = ()) -> tuple[Service, Service]:
    """A worker and the scheduler in front of it; the worker is stopped again if the scheduler fails to start."""
    worker = start_worker(model_dir, log_dir, worker_flags, port=worker_port)
    try:
        return worker, start_scheduler(worker.address, log_dir, port=port, http_port=http_port,
                                       extra=scheduler_flags)
    except BaseException:
        worker.stop()
        raise


def start_scheduler(worker: str, log_dir: pathlib.Path | None, port: int | None = None,
                    extra: list[str] = (), http_port: int | None = None,
                    credentials: grpc.ChannelCredentials | None = None) -> Service:
    """http_port None: a free port (several schedulers may run at once); 0: HTTP off. credentials: how to reach a
    scheduler serving gRPC over TLS."""
    http_port = free_port() if http_port is None else http_port
    service = Service.start("scheduler", "scheduler_svc", ["--worker", worker, "--http-port", str(http_port), *extra],
                            log_dir, port=port, credentials=credentials)
    service.http_url = f"http://{service.address.rsplit(':', 1)[0]}:{http_port}" if http_port else ""
    return service
