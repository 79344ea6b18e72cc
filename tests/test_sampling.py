"""On-device sampling: each row's parameters honoured, seeded rows independent of the rest of the batch."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, dtypes

from worker_svc.sampling import (NUM_LOGPROBS, PROMPT_FLAG, STOP_FLAG, apply_bias_and_penalties, sample,
                                 token_logprobs)

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


def test_the_high_half_of_a_64_bit_seed_counts():
    """Seeds 2**32 + 1 and 2**64 - 1 used to draw exactly what seeds 1 and 0 draw (folded to 32 bits); now the high
    half changes the noise, a zero high half changes nothing, and a seed draws the same noise in any batch."""
    from worker_svc.sampling import uniform_noise

    def noise(lows, highs, counter=0):
        return uniform_noise(Tensor(np.asarray(lows, np.uint32)), Tensor(np.full(len(lows), counter, np.uint32)), V,
                             None if highs is None else Tensor(np.asarray(highs, np.uint32))).numpy()

    lows, highs = [1, 1, 0xFFFFFFFF, 0], [0, 1, 0xFFFFFFFF, 0]  # 1, 2**32 + 1, 2**64 - 1, 0
    n = noise(lows, highs)
    assert len({row.tobytes() for row in n}) == 4
    assert (noise(lows, None) == noise(lows, [0] * 4)).all()
    assert (noise([7, 1], [3, 1])[1] == n[1]).all()


# ---- vLLM's other parameters: each rule against NumPy on the same logits -------------------------------------------
def np_penalized(logits, counts, bias, rep, pres, freq):
    """vLLM's order: bias and allowed mask, repetition (prompt or output tokens), frequency, presence."""
    out = logits.astype(np.float64) + bias
    output = counts & (PROMPT_FLAG - 1)
    seen = counts > 0
    r = np.asarray(rep)[:, None]
    out = np.where(seen, np.where(out > 0, out / r, out * r), out)
    return out - np.asarray(freq)[:, None] * output - np.asarray(pres)[:, None] * (output > 0)


def np_logprobs(logits):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


_extra_jits: dict[str, TinyJit] = {}


def run_extras(logits, counts, bias, rep, pres, freq, temperature, min_p, seeds, counter):
    """Penalties, min_p, sampling and logprobs as the worker's full graph chains them; one captured graph."""
    def fn(lg, c, b, r, p, f, t, m, s, n):
        processed = apply_bias_and_penalties(lg, c, b, r, p, f)
        B = lg.shape[0]
        tok = sample(processed, t, Tensor.zeros(B, dtype=dtypes.int32).contiguous(), Tensor.ones(B).contiguous(),
                     s, n, filters=True, min_p=m)
        return processed.realize(), tok.realize(), token_logprobs(lg, tok).realize()
    jit = _extra_jits.setdefault("x", TinyJit(fn))
    f = lambda x, dt: Tensor(np.asarray(x, dtype=dt))  # noqa: E731
    B = len(logits)
    outs = jit(f(logits, np.float32), f(counts, np.int32), f(bias, np.float32), f(rep, np.float32),
               f(pres, np.float32), f(freq, np.float32), f(temperature, np.float32), f(min_p, np.float32),
               f(seeds, np.uint32), f(np.full(B, counter), np.uint32))
    return [o.numpy().copy() for o in outs]


@pytest.fixture(scope="module")
def extras_case(logits):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, (4, V)).astype(np.int32) * (rng.random((4, V)) < 0.3)
    counts[:, :8] += PROMPT_FLAG  # the prompt held the first 8 ids (some also in the output)
    bias = np.zeros((4, V), np.float32)
    bias[1, [3, 9, 40]] = [5.0, -100.0, 2.5]
    bias[2, :] = -np.inf
    bias[2, [5, 17, 33]] = 0.0  # allowed_token_ids
    bias[2, 17] = 1.0
    return dict(counts=counts, bias=bias, rep=[1.0, 1.3, 0.7, 2.0], pres=[0.0, 0.5, -0.5, 1.5],
                freq=[0.0, 0.2, 0.1, -0.4])


def test_penalties_bias_and_allowed_ids_match_numpy(logits, extras_case):
    c = extras_case
    processed, tok, _ = run_extras(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"], [0] * 4,
                                   [0] * 4, [1, 2, 3, 4], 0)
    want = np_penalized(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"])
    finite = np.isfinite(want)
    assert (np.isfinite(processed) == finite).all()
    np.testing.assert_allclose(processed[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert (tok == want.argmax(-1)).all()  # greedy rows take the argmax of the processed logits
    assert (processed[0] == logits[0]).all()  # neutral parameters change nothing


def test_min_tokens_masks_the_stop_ids_of_rows_short_of_it(logits, extras_case):
    """STOP_FLAG ids get -inf in the rows still short of min_tokens and nothing else changes: the flag counts
    neither as a prompt nor as an output occurrence for the penalties."""
    c = extras_case
    counts = c["counts"].copy()
    counts[:, [2, 7]] += STOP_FLAG  # this request's stop ids (7 is also in its prompt)
    too_early = np.array([True, False, True, False])
    f = lambda x, dt: Tensor(np.asarray(x, dtype=dt))  # noqa: E731
    got = apply_bias_and_penalties(f(logits, np.float32), f(counts, np.int32), f(c["bias"], np.float32),
                                   f(c["rep"], np.float32), f(c["pres"], np.float32), f(c["freq"], np.float32),
                                   Tensor(too_early)).numpy()
    want = np_penalized(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"])
    want[np.ix_(too_early, [2, 7])] = -np.inf
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all()
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_allowed_ids_and_min_p_bound_what_is_sampled(logits, extras_case):
    c = extras_case
    min_p = [0.0, 0.3, 0.0, 0.1]
    want = np_penalized(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"])
    probs = np.exp(want - want.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kept = probs >= np.asarray(min_p)[:, None] * probs.max(-1, keepdims=True)
    seen = np.zeros((4, V), bool)
    for n in range(120):
        _, tok, _ = run_extras(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"], [1.0] * 4, min_p,
                               [5, 6, 7, 8], n)
        seen[np.arange(4), tok] = True
    assert not (seen & ~kept).any()  # min_p (rows 1, 3) and the allowed ids (row 2) are never escaped
    assert set(np.flatnonzero(seen[2])) <= {5, 17, 33}
    assert seen[0].sum() > 10 and seen[1].sum() >= 1 and seen[1].sum() < kept[1].sum() + 1


def test_logprobs_ranks_and_top_alternatives_match_numpy(logits, extras_case):
    c = extras_case
    _, tok, lp = run_extras(logits, c["counts"], c["bias"], c["rep"], c["pres"], c["freq"], [1.0] * 4, [0] * 4,
                            [5, 6, 7, 8], 3)
    want = np_logprobs(logits)  # of the raw model output, vLLM's default, whatever the penalties did
    rows = np.arange(4)
    np.testing.assert_allclose(lp[:, 0], want[rows, tok], atol=1e-4)
    assert (lp[:, 1] == (want >= want[rows, tok][:, None]).sum(-1)).all()
    ids = lp[:, 2:2 + NUM_LOGPROBS].astype(int)
    for r in rows:
        assert sorted(ids[r]) == sorted(np.argsort(-want[r])[:NUM_LOGPROBS])
    np.testing.assert_allclose(lp[:, 2 + NUM_LOGPROBS:], want[rows[:, None], ids], atol=1e-4)


def test_seeded_row_with_penalties_ignores_the_rest_of_the_batch(logits, extras_case):
    c = extras_case
    pick = lambda x, i: np.asarray(x)[i]  # noqa: E731
    alone_rows, crowd_rows = [3, 3, 3, 3], [0, 1, 2, 3]
    a = [run_extras(logits[alone_rows], pick(c["counts"], alone_rows), pick(c["bias"], alone_rows),
                    pick(c["rep"], alone_rows), pick(c["pres"], alone_rows), pick(c["freq"], alone_rows),
                    [0.8] * 4, [0.05] * 4, [9] * 4, n)[1][0] for n in range(8)]
    b = [run_extras(logits[crowd_rows], c["counts"], c["bias"], c["rep"], c["pres"], c["freq"],
                    [1.0, 0.3, 1.0, 0.8], [0, 0.2, 0, 0.05], [1, 2, 3, 9], n)[1][3] for n in range(8)]
    assert a == b
