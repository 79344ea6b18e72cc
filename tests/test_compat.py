"""The tinygrad 0.14.0 workarounds in worker_svc.compat (the CUDA graph itself is exercised on a GPU only)."""
import pytest

from worker_svc.compat import clamp_launch_dims


def test_zero_sized_launch_dims_are_clamped_for_graph_construction():
    assert clamp_launch_dims(((0, 4, 1), (32, 1, 1))) == ((1, 4, 1), (32, 1, 1))
    assert clamp_launch_dims(((8, 0, 0), None)) == ((8, 1, 1), None)
    assert clamp_launch_dims(((3, 2, 1), (0, 2, 1))) == ((3, 2, 1), (1, 2, 1))


def test_symbolic_kernel_estimates_stay_shallow(demo_checkpoint):
    """Unsimplified, the FLOP estimate of a kernel with a symbolic size is a chain of one add per op; its repr()
    (tinygrad hashes kernels by repr) overflowed Python 3.12's C recursion limit at TinyLlama scale."""
    from tinygrad.uop.ops import Ops, UOp

    from tests.models import build_model
    from worker_svc.runner import ModelRunner

    model = build_model(demo_checkpoint, num_blocks=16)
    with pytest.raises(ValueError, match="prefill shape"):
        ModelRunner(model, [2], [], max_steps=2)  # the scheduler needs a prefill bucket
    runner = ModelRunner(model, [2], [(1, 16)], max_steps=2)
    runner.warm_up(progress=False)

    def depth(u: UOp) -> int:
        d: dict[UOp, int] = {}
        for n in u.toposort():
            d[n] = 1 + max((d[s] for s in n.src), default=0)
        return d[u]

    symbolic = 0
    for call in runner.captured()[(2, 1, True)]._linear.toposort():
        if call.op is Ops.SINK and getattr(call.arg, "estimates", None) is not None:
            for value in (call.arg.estimates.ops, call.arg.estimates.lds, call.arg.estimates.mem):
                if isinstance(value, UOp):
                    symbolic += 1
                    assert depth(value) <= 32
    assert symbolic > 0  # the attention kernels' estimates do depend on the block count


def _fixes_applied_here() -> bool:
    """Runs inside one of tinygrad's compile worker processes."""
    from tinygrad.renderer import Estimates

    return "simplify_symbolic_estimates" in Estimates.from_uops.__qualname__


def test_compile_worker_processes_get_the_fixes():
    """tinygrad compiles kernels and searches BEAM candidates in spawned processes, which start without the
    parent's patches; the pool's initializer applies them there."""
    from tinygrad.engine import worker
    from tinygrad.helpers import Context

    from worker_svc import compat

    compat.apply_for("CPU")
    with Context(PARALLEL=1):
        pool = worker.get_worker_pool()
        try:
            assert pool is not None
            assert pool.apply(_fixes_applied_here) is True
        finally:
            worker.terminate_worker_pool()


def test_tinygrads_cache_database_works_from_any_thread(tmp_path, monkeypatch):
    """A kernel compiled after warm-up, in a gRPC thread (a graph captured on its first use), looks itself up in
    tinygrad's cache database: with tinygrad's one connection, opened by the warm-up's thread, sqlite refused."""
    import threading

    from tinygrad import helpers

    from worker_svc.compat import per_thread_cache_database

    per_thread_cache_database()
    monkeypatch.setattr(helpers, "CACHEDB", str(tmp_path / "cache.db"))
    out, errors = [], []

    def use(value: int) -> None:
        try:
            helpers.diskcache_put("compat_test", value, value * 2)
            out.append(helpers.diskcache_get("compat_test", value))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
    for value in (1, 2):  # each in a thread of its own, as the server's pool runs calls
        thread = threading.Thread(target=use, args=(value,))
        thread.start()
        thread.join()
    assert not errors and out == [2, 4]


def test_replay_skips_tinygrads_input_preparation_and_matches_it(monkeypatch):
    """compat.replay: after capture and one checked replay, a graph gets its buffers and variables directly (no
    per-call rewrite of its inputs) and computes what TinyJit's own call computes, variables included."""
    import numpy as np
    from tinygrad import Tensor, TinyJit, UOp
    from tinygrad.engine import jit as jit_module

    from worker_svc import compat

    x = Tensor(np.arange(8, dtype=np.float32)).realize()
    step = UOp.variable("replay_step", 0, 9)
    out = Tensor.zeros(8).contiguous().realize()

    @TinyJit
    def f(x: Tensor, s: UOp) -> Tensor:
        return out.assign(x * 2 + Tensor(s).float()).realize()

    prepared = []
    original = jit_module._prepare_jit_inputs
    monkeypatch.setattr(jit_module, "_prepare_jit_inputs", lambda *a: prepared.append(1) or original(*a))
    for i in range(3):  # eager, capture, checked replay: tinygrad's own path
        compat.replay(f, x, step.bind(i))
    assert len(prepared) == 3
    for i in (4, 7):
        compat.replay(f, x, step.bind(i))
        assert out.numpy().tolist() == (np.arange(8) * 2 + i).tolist()
    assert len(prepared) == 3, "a replay prepared its inputs again"
    x.assign(Tensor(np.ones(8, dtype=np.float32))).realize()  # same buffer, new contents
    compat.replay(f, x, step.bind(1))
    assert out.numpy().tolist() == [3.0] * 8
