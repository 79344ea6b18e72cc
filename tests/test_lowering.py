"""worker_svc.lowering swaps compiled programs into a linear without tinygrad's graph rewrites; the result must be
the very linear tinygrad's own lower_and_compile gives (UOps are hash-consed: equal graphs are the same object)."""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor
from tinygrad.engine import realize

from worker_svc import lowering


def test_the_same_linear_as_tinygrads():
    lowering.install()
    a = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4)).realize()
    out = ((a * 2).sum(1) + a.max(1)).exp2()
    linear, _ = out.linear_with_vars()
    assert sum(1 for c in linear.src if c.src[0].op.name == "SINK") >= 1  # kernels left to lower
    ours = lowering.lower_and_compile(linear)
    assert ours is realize._tinygrad_lower_and_compile(linear)
    assert all(c.src[0].op.name != "SINK" for c in ours.src)
