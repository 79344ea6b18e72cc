"""Per-row sampling on the device: greedy, temperature, top-k, top-p and a seeded, batch-independent RNG.

Everything here is plain tensor math with fixed shapes, so it is captured inside the decode graph and only the
sampled token ids leave the device. No sort: top-k and top-p thresholds are found by a few rounds of a
16-way grid search per row, which is a handful of reductions over the vocabulary instead of a bitonic sort.
"""
from __future__ import annotations

from tinygrad import Tensor, dtypes

GRID = 16
ROUNDS = 5  # resolution: 16**5 ~ 1e6 steps between the row's lowest and highest value


def _uint32(x: int) -> Tensor:
    return Tensor(x, dtype=dtypes.uint32)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (lowbias32): cheap, and good enough to turn counters into uniform noise."""
    x = x ^ (x >> 16)
    x = x * _uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, counters: Tensor, vocab: int, seeds_high: Tensor | None = None) -> Tensor:
    """(B, vocab) floats in (0, 1) that depend only on each row's (seed, counter), never on the rest of the batch.

    The seed is 64 bits, its high half in `seeds_high` (None: 0). The high half enters through _mix, which maps
    0 to 0, so seeds below 2**32 draw what they drew before; seeds that differ only in the high half (2**32 + 1
    and 1) draw different noise, as the public API promises."""
    key = seeds.cast(dtypes.uint32) * _uint32(0x9E3779B1)
    if seeds_high is not None:
        key = key ^ _mix(seeds_high.cast(dtypes.uint32) * _uint32(0x2545F491))
    rows = _mix(key ^ _mix(counters.cast(dtypes.uint32) + _uint32(0x632BE5AB)))
    cols = Tensor.arange(vocab).cast(dtypes.uint32).reshape(1, vocab)
    bits = _mix(rows.reshape(-1, 1) ^ (cols * _uint32(0x85EBCA77)))
    return ((bits >> 8).cast(dtypes.float32) + 0.5) * (1.0 / (1 << 24))


CHUNK = 256  # vocabulary entries per partial sum of a vocabulary-wide count


def _chunked(x: Tensor, fill: float) -> Tensor:
    """(..., V) -> (..., ceil(V / CHUNK), CHUNK), padded with `fill`, for `_vocab_sum`."""
    *lead, V = x.shape
    return x.pad(((0, 0),) * len(lead) + ((0, -V % CHUNK),), value=fill).reshape(*lead, -1, CHUNK)


def _vocab_sum(x: Tensor) -> Tensor:
    """(..., C, CHUNK) -> (...): a sum over the vocabulary as two, each chunk's and then the chunks'. As one
    reduction tinygrad ran it on a single workgroup per row with each thread looping over all 32,000 entries
    (`r_16_32000` at batch 1: 16 threads); chunked, thousands of threads share the work."""
    return x.sum(-1).contiguous().sum(-1)


def _vocab_max(x: Tensor) -> Tensor:
    """(..., V) -> (..., 1): the largest entry, chunk by chunk and then over the chunks (see `_vocab_sum`)."""
    return _chunked(x, -float("inf")).max(-1).contiguous().max(-1, keepdim=True)


def _vocab_min(x: Tensor) -> Tensor:
    return -_vocab_max(-x)


def softmax(x: Tensor) -> Tensor:
    """x.softmax(-1) over the vocabulary with chunked reductions: as one reduction each, the max and the sum ran on
    16 threads per row looping over 2,000 entries each (`r_16_2000`)."""
    e = (x - _vocab_max(x)).exp()
    return e / _vocab_sum(_chunked(e, 0.0)).unsqueeze(-1)


def log_softmax(x: Tensor) -> Tensor:
    shifted = x - _vocab_max(x)
    return shifted - _vocab_sum(_chunked(shifted.exp(), 0.0)).log().unsqueeze(-1)


def argmax(x: Tensor) -> Tensor:
    """(B, V) -> (B,) int32: the first index of each row's largest entry, as Tensor.argmax, in chunked reductions.
    x is written out once so that the max and the search for it read the same stored values (recomputed in two
    kernels, a compiler could round them differently)."""
    B, V = x.shape
    x = x.contiguous()
    top = _vocab_max(x).reshape(B, 1, 1)
    chunks = _chunked(x, -float("inf"))
    index = Tensor.arange(chunks.shape[-2] * CHUNK, dtype=dtypes.int32).reshape(chunks.shape[-2:])
    first = (chunks == top).where(index, V).min(-1).contiguous().min(-1)  # padding is -inf: never before a real max
    return first.minimum(V - 1).cast(dtypes.int32)


def _largest_passing(lo: Tensor, hi: Tensor, passes) -> Tensor:
    """Per row, the largest threshold t in [lo, hi] with passes(t) true, to a 16**ROUNDS resolution.

    `passes(t)` gets the (B, GRID, 1, 1) candidates and returns (B, GRID) bools: true at lo and monotonically
    decreasing in t. lo and hi are (B, 1)."""
    steps = Tensor.arange(1, GRID + 1).float().reshape(1, GRID)
    for _ in range(ROUNDS):
        width = (hi - lo) / GRID
        candidates = lo + width * steps  # (B, GRID)
        n_pass = passes(candidates.reshape(-1, GRID, 1, 1)).sum(-1, keepdim=True).float()  # (B, 1)
        lo = lo + width * n_pass
        hi = lo + width
    return lo


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor,
           counters: Tensor, filters: bool = True, min_p: Tensor | None = None,
           seeds_high: Tensor | None = None) -> Tensor:
    """Token ids (B,) int32. temperature <= 0 is greedy; top_k <= 0 and top_p >= 1 switch those filters off;
    min_p (B,) float (0: off) applies after temperature, before top-k/top-p, as in vLLM; seeds_high: the high
    halves of the 64-bit seeds (None: 0).

    filters=False leaves the top-k/top-p search out of the graph (a third of a small model's kernels); a row
    with both filters off gets the same token either way, so the runner may pick whichever graph fits the batch.
    Logits may hold -inf (tokens a row may not emit)."""
    B, V = logits.shape
    greedy = (temperature <= 0).reshape(B, 1)
    scaled = logits.float() / greedy.where(1.0, temperature.reshape(B, 1).maximum(1e-6))
    if min_p is not None:
        # tokens a row may not emit (-inf: allowed ids, min_p) sit 1000 below its best token instead: never drawn
        # (Gumbel noise spans about 20), and the top-k/top-p search keeps a finite range
        scaled = apply_min_p(scaled, min_p)
        scaled = scaled.maximum(_vocab_max(scaled) - 1000.0)
    if filters:
        scaled = _top_k_top_p(scaled, top_k, top_p)

    # Gumbel-max: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). Greedy rows add no noise,
    # so one argmax serves both (two argmaxes over the vocabulary fused into one slow kernel on CUDA).
    gumbel = -(-uniform_noise(seeds, counters, V, seeds_high).log()).log()
    return argmax(scaled + greedy.where(0.0, gumbel))


def _top_k_top_p(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Temperature-scaled logits with the tokens outside each row's top-k and top-p set to -inf."""
    B, V = scaled.shape
    # top-k: keep logits >= the largest threshold that still leaves at least k of them
    k = (top_k <= 0).where(V, top_k.minimum(V)).reshape(B, 1).float()
    vals = _chunked(scaled.reshape(B, 1, V), -float("inf"))
    lo, hi = _vocab_min(scaled), _vocab_max(scaled)
    kth = _largest_passing(lo, hi, lambda t: _vocab_sum(vals >= t) >= k)
    scaled = (scaled >= kth).where(scaled, -float("inf"))

    # top-p: keep the most likely tokens whose probabilities sum to at least top_p
    probs = softmax(scaled)
    p = top_p.reshape(B, 1)
    pvals = _chunked(probs.reshape(B, 1, V), 0.0)
    zero, pmax = probs[:, :1] * 0, _vocab_max(probs)
    cut = _largest_passing(zero, pmax, lambda t: _vocab_sum((pvals >= t).where(pvals, 0)) >= p)
    cut = (p >= 1.0).where(0.0, cut)
    return (probs >= cut).where(scaled, -float("inf"))


# ---- the parameters beyond temperature/top-k/top-p (vLLM's meanings), in the graph that runs when a row asks ----
PROMPT_FLAG = 1 << 20
"""Per-slot token counts: output occurrences in the low 20 bits, plus PROMPT_FLAG once if the prompt holds it."""
STOP_FLAG = 1 << 21
"""... and STOP_FLAG on the ids that may not be sampled while the row is short of its min_tokens."""
NUM_LOGPROBS = 20  # vLLM's cap on top alternatives per token


def apply_bias_and_penalties(logits: Tensor, counts: Tensor, bias: Tensor, repetition: Tensor, presence: Tensor,
                             frequency: Tensor, too_early: Tensor | None = None) -> Tensor:
    """vLLM's order: logit bias and the allowed-ids mask (-inf in `bias`), min_tokens (-inf on the STOP_FLAG ids
    of rows `too_early`, (B,) bool), then the repetition penalty (prompt and output tokens: positive logits
    divided, negative multiplied), then frequency (times the output count) and presence (once per output token
    seen). counts (B, V) int32, bias (B, V) float32, penalties (B,)."""
    B = logits.shape[0]
    logits = logits.float() + bias
    if too_early is not None:
        logits = (too_early.reshape(B, 1) & (counts.bitwise_and(STOP_FLAG) != 0)).where(-float("inf"), logits)
    output = counts.bitwise_and(PROMPT_FLAG - 1)
    rep = repetition.reshape(B, 1)
    logits = (counts.bitwise_and(STOP_FLAG - 1) > 0).where((logits > 0).where(logits / rep, logits * rep), logits)
    return logits - frequency.reshape(B, 1) * output.float() - presence.reshape(B, 1) * (output > 0).float()


def apply_min_p(scaled: Tensor, min_p: Tensor) -> Tensor:
    """Tokens whose probability (after temperature) is below min_p times the row's most likely one's: -inf."""
    B = scaled.shape[0]
    probs = softmax(scaled)
    return (probs < min_p.reshape(B, 1) * _vocab_max(probs)).where(-float("inf"), scaled)


def token_logprobs(logits: Tensor, chosen: Tensor, k: int = NUM_LOGPROBS) -> Tensor:
    """(B, 2 + 2k) float32 per row: the chosen token's log-probability and rank (1 = the most likely; ties count
    as ahead), then the ids of k most likely tokens and their log-probabilities, in no particular order (the host
    sorts k values). Log-probabilities of the raw model output, as vLLM's default. No sort over the vocabulary:
    the k-th largest value is found by the threshold search, then the ids at or above it are gathered by their
    running count."""
    B, V = logits.shape
    lp = log_softmax(logits.float()).contiguous()  # stored once: every comparison below reads the same values
    mine = lp.gather(1, chosen.reshape(B, 1).cast(dtypes.int32))
    rank = _vocab_sum(_chunked((lp >= mine).float(), 0.0)).unsqueeze(-1)
    kk = Tensor.full((B, 1), min(k, V)).float()
    vals = _chunked(lp.reshape(B, 1, V), -float("inf"))
    lo, hi = _vocab_min(lp), _vocab_max(lp)
    kth = _largest_passing(lo, hi, lambda t: _vocab_sum(vals >= t) >= kk)
    keep = lp >= kth
    order = keep.cast(dtypes.int32).cumsum(-1)  # 1, 2, ... at the kept ids
    want = Tensor.arange(1, k + 1, dtype=dtypes.int32).reshape(1, k, 1)
    hit = keep.reshape(B, 1, V) & (order.reshape(B, 1, V) == want)
    ids = _vocab_sum(_chunked(hit.where(Tensor.arange(V, dtype=dtypes.int32).reshape(1, 1, V), 0), 0))  # (B, k)
    top = lp.gather(1, ids)
    return mine.cat(rank, ids.float(), top, dim=1)
