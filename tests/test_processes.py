"""Starting services: a taken port is reported at once with a clear error (not after loading and warming up), and
a service that becomes ready late is noticed within about a second."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from shared.processes import ROOT, free_port, start_scheduler, start_worker, wait_serving


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_taken_port_fails_the_worker_before_warm_up(demo_checkpoint, tmp_path, taken_port):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        start_worker(demo_checkpoint, tmp_path, [], port=taken_port)
    # the error came before the model was loaded or any graph captured (that takes tens of seconds here)
    assert time.monotonic() - t0 < 15
    assert f"127.0.0.1:{taken_port} is taken" in str(err.value) and "capturing" not in str(err.value)


def test_a_taken_port_fails_the_scheduler_before_it_waits_for_a_worker(tmp_path, taken_port):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:  # no worker at this address: it would have waited for one
        start_scheduler(f"127.0.0.1:{free_port()}", tmp_path, port=taken_port)
    assert time.monotonic() - t0 < 15
    assert f"127.0.0.1:{taken_port} is taken" in str(err.value)


# a health server that starts serving after DELAY_S: what a worker finishing its warm-up looks like to a launcher
DELAY_S = 6.0
LATE_SERVER = textwrap.dedent("""
    import sys, time
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc
    time.sleep(float(sys.argv[2]))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(sys.argv[1])
    server.start()
    print("serving", time.time(), flush=True)
    time.sleep(60)
""")


def test_a_service_ready_late_is_noticed_within_a_second(tmp_path):
    """gRPC's reconnect backoff grows while nothing listens: after 6 s of warm-up the launcher saw the service
    about 3 s late (after a minute of warm-up, tens of seconds); with a 1 s cap, within about a second."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "late.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LATE_SERVER, address, str(DELAY_S)], cwd=ROOT, stdout=out)
    try:
        wait_serving(address, proc, log, timeout_s=60)
        noticed = time.time()
        served = float(log.read_text().split()[1])
        assert noticed - served < 1.6, f"noticed {noticed - served:.2f} s after it served"
    finally:
        proc.kill()
        proc.wait()
