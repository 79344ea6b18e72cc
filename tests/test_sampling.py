"""On-device sampling: each row's parameters honoured, seeded rows independent of the rest of the batch."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit

from worker_svc.sampling import sample

V = 64
_jits: dict[int, TinyJit] = {}


def draw(logits, temperature, top_k, top_p, seeds, counter) -> np.ndarray:
    """Captured once per batch size, as in the worker, so hundreds of draws replay one graph."""
    B = len(logits)
    jit = _jits.setdefault(B, TinyJit(lambda *args: sample(*args).realize()))
    f = lambda x, dt: Tensor(np.asarray(x, dtype=dt))  # noqa: E731
    return jit(f(logits, np.float32), f(temperature, np.float32), f(top_k, np.int32), f(top_p, np.float32),
               f(seeds, np.uint32), f(np.full(B, counter), np.uint32)).numpy().copy()


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, V)).astype(np.float32) * 2


def test_greedy_is_argmax(logits):
    out = draw(logits, [0] * 4, [0] * 4, [1] * 4, [1, 2, 3, 4], 0)
    assert (out == logits.argmax(-1)).all()


def test_filters_and_distribution(logits):
    """Row 0 plain, row 1 top-k 3, row 2 top-p 0.5, row 3 top-k 1; 300 draws each."""
    counts = np.zeros((4, V), int)
    for c in range(300):
        out = draw(logits, [1, 1, 1, 1], [0, 3, 0, 1], [1, 1, 0.5, 1], [11, 12, 13, 14], c)
        counts[np.arange(4), out] += 1
    assert set(np.flatnonzero(counts[1])) <= set(np.argsort(-logits[1])[:3])
    assert len(np.flatnonzero(counts[1])) == 3
    order = np.argsort(-logits[2])
    probs = np.exp(logits[2] - logits[2].max())
    probs /= probs.sum()
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
    assert set(np.flatnonzero(counts[2])) <= set(nucleus)
    assert np.flatnonzero(counts[3]).tolist() == [logits[3].argmax()]
    p0 = np.exp(logits[0] - logits[0].max())
    p0 /= p0.sum()
    assert np.abs(counts[0] / 300 - p0).max() < 0.08  # a draw from softmax, not argmax
    assert len(np.flatnonzero(counts[0])) > 10


def test_seeded_row_ignores_the_rest_of_the_batch(logits):
    alone = [draw(logits[:1], [1.0], [0], [1.0], [42], c)[0] for c in range(20)]
    crowded = [draw(logits[[0, 1, 2, 0]], [1.0, 0.5, 1.0, 1.0], [0, 5, 0, 0], [1.0, 0.9, 1.0, 1.0],
                    [7, 8, 42, 42], c) for c in range(20)]
    assert [row[3] for row in crowded] == alone
    assert [row[0] for row in crowded] != alone  # a different seed gives a different stream
