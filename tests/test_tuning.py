"""Tuning tables (worker_svc.tuning): what a BEAM search found is recorded, and a later process applies it without
searching, in its own process and in tinygrad's compile workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

# one small matmul kernel; `record` searches it with BEAM=1 and saves the table, `apply` compiles it with no search
SCRIPT = r"""
import json, os, sys
from worker_svc.compat import apply_for, configure_environment
configure_environment()
from tinygrad import Context, Device, Tensor
from worker_svc import tuning
mode, path = sys.argv[1], sys.argv[2]
apply_for(Device.DEFAULT)
a, b = Tensor.ones(32, 48).contiguous().realize(), Tensor.ones(48, 40).contiguous().realize()
if mode == "record":
    table = tuning.TuningTable(device=Device.DEFAULT)
    tuning.install(table, record_min_bytes=0)
    with Context(BEAM=1):
        assert (a @ b).tolist()[0][0] == 48
    table.save(path, {})
    print(json.dumps({"misses": table.misses}))
else:
    table = tuning.load_for(Device.DEFAULT, path)
    tuning.install(table)
    from tinygrad.codegen.opt import search
    def no_search(*args, **kwargs): raise AssertionError("searched although the table knows the kernel")
    search.beam_search = no_search
    with Context(BEAM=int(mode == "apply-beam")):
        assert (a @ b).tolist()[0][0] == 48
    print(json.dumps({"hits": table.hits, "env": os.environ.get(tuning.ENV)}))
"""


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEV": "CPU", "PARALLEL": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_recorded_table_is_applied_without_search(tmp_path):
    path = tmp_path / "CPU.json"
    assert run("record", str(path))["misses"] >= 1
    table = json.loads(path.read_text())
    assert table["device"] == "CPU" and len(table["kernels"]) >= 1
    assert all(isinstance(opts, list) for opts in table["kernels"].values())
    # with BEAM on, a kernel the table knows is not searched (search is replaced by a function that fails)
    applied = run("apply-beam", str(path))
    assert applied["hits"] >= 1 and applied["env"] == str(path)  # compile workers find it through the environment
    assert run("apply", str(path))["hits"] >= 1
