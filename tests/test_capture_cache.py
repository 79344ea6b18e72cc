"""The capture cache (worker_svc.capture_cache): a restarted worker takes its schedules and lowered kernels from
disk, and its graphs give exactly the tokens that freshly captured ones give; a key changes with what decides the
cached value."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

# a worker engine with one decode and one prefill bucket; prints the tokens of a prefill and of decode calls through
# both graphs (plain and full sampling), and the cache's hits and misses
SCRIPT = r"""
import json, sys
import numpy as np
from worker_svc.compat import configure_environment
configure_environment()
from worker_svc import capture_cache
from worker_svc.engine import WorkerEngine, WorkerOptions
engine = WorkerEngine(WorkerOptions(model=sys.argv[1], decode_batch_sizes=[2], prefill_shapes=[(2, 16)], max_steps=2,
                                    kv_blocks=9, max_context=64, tuning="none"))
r = engine.runner
prefill = r.dummy_batch(2, 16)
prefill.token_ids[:] = np.arange(3, 35).reshape(2, 16)
prefill.chunk_lens[:] = 16
prefill.block_tables[0, :2], prefill.block_tables[1, :2] = (1, 2), (3, 4)
prefill.temperature[:], prefill.seeds[:] = 0.8, (7, 9)
out = [r.execute(prefill).tolist()]
for top_k in (0, 3):
    decode = r.dummy_batch(2, 1, num_steps=2)
    decode.token_ids[:, 0], decode.positions[:], decode.chunk_lens[:] = (5, 6), 16, 1
    decode.block_tables[:] = prefill.block_tables
    decode.temperature[:], decode.seeds[:], decode.top_k[:] = 0.8, (7, 9), top_k
    out.append(r.execute(decode).tolist())
# after warm-up, from another thread (as the gRPC server calls): a slot's penalties are written by eager kernels
# scheduled for the first time here, which must not touch the cache database (a connection of the warm-up's thread)
import threading
from worker_svc.runner import SlotInit
decode.slots = np.array([1, 0], np.int32)
decode.repetition_penalty = np.array([1.3, 1.0], np.float32)
decode.slot_inits = [SlotInit(1, np.arange(3, 19), np.array([5]), np.array([7]), np.array([2.0], np.float32),
                              np.array([], np.int64))]
thread = threading.Thread(target=lambda: out.append(r.execute(decode).tolist()))
thread.start()
thread.join()
print(json.dumps({"tokens": out, "cache": vars(capture_cache.stats)}))
"""


def start(checkpoint, cache_db) -> dict:
    # PARALLEL as a worker runs: kernels compile in tinygrad's pool, so only what this module does opens the cache
    # database in the warm-up's thread (tinygrad's own connection works only in the thread that opened it)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEV": "CPU", "PARALLEL": "2", "CACHEDB": str(cache_db)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_restart_takes_everything_from_disk_and_gives_the_same_tokens(demo_checkpoint, tmp_path):
    first = start(demo_checkpoint, tmp_path / "cache.db")
    assert first["cache"]["schedule_hits"] == first["cache"]["program_hits"] == 0
    assert first["cache"]["schedule_misses"] > 0 and first["cache"]["program_misses"] > 0
    again = start(demo_checkpoint, tmp_path / "cache.db")
    assert again["cache"]["schedule_misses"] == again["cache"]["program_misses"] == 0
    assert again["cache"]["schedule_hits"] >= first["cache"]["schedule_misses"]
    assert again["cache"]["program_hits"] == first["cache"]["program_misses"]
    assert len(first["tokens"]) == 4  # the call from another thread after warm-up ran too
    assert again["tokens"] == first["tokens"]  # the first start captured without the cache's help


def test_keys_follow_what_decides_the_value():
    """A program's key changes with the tuning table; both keys with tinygrad's settings; never with nothing."""
    from tinygrad import Context, Device

    from worker_svc import capture_cache, tuning

    renderer = Device[Device.DEFAULT].renderer
    program = (b"\x01" * 32, type(renderer), renderer.target, 0)
    saved = tuning._table
    try:
        tuning._table = None
        plain = capture_cache.program_key(program, renderer)
        assert capture_cache.program_key(program, renderer) == plain
        tuning._table = tuning.TuningTable({"k": [["LOCAL", 0, 4]]}, "CPU")
        tuned = capture_cache.program_key(program, renderer)
        tuning._table = tuning.TuningTable({"k": [["LOCAL", 0, 8]]}, "CPU")
        assert len({plain, tuned, capture_cache.program_key(program, renderer)}) == 3
    finally:
        tuning._table = saved
    schedules = capture_cache._schedules_fingerprint()  # schedules are stored under it, by the graph's own key
    with Context(SPLIT_REDUCEOP=0):
        assert capture_cache._schedules_fingerprint() != schedules
    with Context(DEBUG=1):  # reporting only
        assert capture_cache._schedules_fingerprint() == schedules


def test_what_is_stored_carries_no_buffer_contents():
    """A schedule naming a buffer tinygrad had attached data to is stored as structure: never megabytes of data."""
    import pickle

    import numpy as np
    from tinygrad import Tensor

    from worker_svc import capture_cache

    t = Tensor(np.ones(1 << 18, np.float32)).realize()  # 1 MB
    assert len(pickle.dumps(t.uop)) > 1 << 20  # tinygrad's own pickling carries the contents
    assert len(capture_cache.dumps(t.uop)) < 4096
