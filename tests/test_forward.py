"""The worker's tinygrad forward pass against the independent NumPy reference, through the paged KV cache."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor, UOp, dtypes

from shared.demo_checkpoint import build_checkpoint
from tests.models import build_model
from tests.reference import NumpyLlama
from worker_svc.model import LlamaModel, project, split_k_for_tensor_cores

BLOCK = 16
MAX_CONTEXT = 128
WIDTH = MAX_CONTEXT // BLOCK


@pytest.fixture(scope="module", params=["fp32", "fp16-tied-sharded", "fp32-split-k"])
def checkpoint(request, demo_checkpoint, tmp_path_factory):
    """(checkpoint, tolerance, split-K ways forced on every projection: the tensor-core path, run on the CPU)."""
    if request.param == "fp32":
        return demo_checkpoint, 1e-4, None
    if request.param == "fp32-split-k":
        return demo_checkpoint, 1e-4, 4
    path = build_checkpoint(tmp_path_factory.mktemp("demo-fp16"), dtype="float16", seed=1, tie_word_embeddings=True,
                            shards=2)
    return path, 3e-2, None


def make_model(path, split: int | None = None) -> LlamaModel:
    model = build_model(path, num_blocks=32, max_context=MAX_CONTEXT, block_size=BLOCK)
    if split is not None:
        model.split_k = lambda rows, K, N: split
    return model


def run(model: LlamaModel, rows: list[tuple[list[int], int, list[int]]], T: int) -> np.ndarray:
    """rows: (tokens of this chunk, position of its first token, the sequence's block ids). Returns (B, V) logits."""
    B = len(rows)
    tokens, positions, slots = (np.zeros((B, T), np.int32) for _ in range(3))
    tables, last = np.zeros((B, WIDTH), np.int32), np.zeros(B, np.int32)
    for i, (chunk, start, blocks) in enumerate(rows):
        tables[i, :len(blocks)] = blocks
        pos = start + np.arange(len(chunk))
        tokens[i, :len(chunk)], positions[i, :len(chunk)] = chunk, pos
        slots[i, :len(chunk)] = tables[i, pos // BLOCK] * BLOCK + pos % BLOCK  # padding tokens write to null block 0
        last[i] = len(chunk) - 1
    n = max(-(-(start + len(chunk)) // BLOCK) for chunk, start, _ in rows)
    num_blocks = UOp.variable("num_blocks", 1, WIDTH).bind(n)
    out = model.logits(Tensor(tokens), Tensor(positions), Tensor(slots), Tensor(tables), num_blocks,
                       Tensor(last) if T > 1 else None)
    return out.numpy()


def close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, f"max error {err:.2e} of the logits' range exceeds {rtol:.0e}"
    assert got.argmax() == want.argmax() or rtol > 1e-3


def test_prefill_and_decode_through_shuffled_paged_cache(checkpoint):
    path, rtol, split = checkpoint
    model, ref = make_model(path, split), NumpyLlama(path)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    seqs = [[int(x) for x in rng.integers(3, vocab, size=n)] for n in (11, 16, 20)]
    continuations = [[int(x) for x in rng.integers(3, vocab, size=3)] for _ in seqs]
    blocks = [[7, 3, 21], [12, 5, 30], [9, 2, 17]]  # non-contiguous, out of order, interleaved between sequences
    refs = [ref.logits(s + c) for s, c in zip(seqs, continuations)]

    # prefill: sequences 0 and 1 whole; sequence 2 in two chunks (16 + 4), the second reading the first from the cache
    got = run(model, [(seqs[0], 0, blocks[0]), (seqs[1], 0, blocks[1]), (seqs[2][:16], 0, blocks[2])], T=16)
    close(got[0], refs[0][10], rtol)
    close(got[1], refs[1][15], rtol)
    close(got[2], refs[2][15], rtol)
    got = run(model, [(seqs[2][16:], 16, blocks[2])], T=16)
    close(got[0], refs[2][19], rtol)

    # decode: three steps for all three at once; sequence 1 moves into its second block
    for step in range(3):
        rows = [([continuations[i][step]], len(seqs[i]) + step, blocks[i]) for i in range(3)]
        got = run(model, rows, T=1)
        for i in range(3):
            close(got[i], refs[i][len(seqs[i]) + step], rtol)


@pytest.mark.parametrize("rows, K, N, split", [(1, 2048, 2048, 1), (16, 5632, 2048, 8), (64, 2048, 11264, 2),
                                               (256, 2048, 2048, 4), (2048, 5632, 2048, 1), (64, 24, 64, 1)])
def test_split_k_choice(rows, K, N, split):
    """The split-K rule: more ways for fewer rows, none for matrix-vector work or a K it does not divide."""
    assert split_k_for_tensor_cores(rows, K, N) == split


def test_split_k_product_matches_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 64)).astype(np.float32), rng.standard_normal((40, 64)).astype(np.float32)
    for split in (1, 2, 4):
        got = project(Tensor(x), Tensor(w), split).numpy()
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)


def test_row_sum_of_squares_and_materialized_norm_match_numpy():
    """`sum_squares` (the custom kernel behind RMSNorm before tensor-core products) and the norm built on it."""
    from worker_svc.model import rms_norm, sum_squares

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_allclose(sum_squares(Tensor(x)).numpy(), (x * x).sum(-1, keepdims=True), rtol=1e-5)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    for materialize in (False, True):
        got = rms_norm(Tensor(x), Tensor(w), 1e-5, materialize=materialize).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_norm_project_matches_numpy():
    """`norm_project` (RMSNorm and the matrix-vector product in one kernel, below 16 rows) in fp32 and fp16."""
    from worker_svc.model import norm_project

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 96)).astype(np.float32) * 3
    g, w = rng.standard_normal(96).astype(np.float32), rng.standard_normal((40, 96)).astype(np.float32)
    want = (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g) @ w.T
    got = norm_project(Tensor(x), Tensor(g), Tensor(w), 1e-5).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    g16, w16 = g.astype(np.float16), w.astype(np.float16)
    got16 = norm_project(Tensor(x[:1]), Tensor(g16), Tensor(w16), 1e-5)
    assert got16.dtype == dtypes.float16
    np.testing.assert_allclose(got16.numpy().astype(np.float32), want[:1], rtol=2e-2, atol=2e-2)
