"""The tinygrad 0.14.0 workarounds in worker_svc.compat (the CUDA graph itself is exercised on a GPU only)."""
from worker_svc.compat import clamp_launch_dims


def test_zero_sized_launch_dims_are_clamped_for_graph_construction():
    assert clamp_launch_dims(((0, 4, 1), (32, 1, 1))) == ((1, 4, 1), (32, 1, 1))
    assert clamp_launch_dims(((8, 0, 0), None)) == ((8, 1, 1), None)
    assert clamp_launch_dims(((3, 2, 1), (0, 2, 1))) == ((3, 2, 1), (1, 2, 1))
