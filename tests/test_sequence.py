"""Incremental detokenization and stop handling, with the demo checkpoint's real SentencePiece model."""
from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.sequence import Finish, Sampling, Sequence
from scheduler_svc.tokenizer import IncrementalDetokenizer, SentencePieceTokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(demo_checkpoint) -> Tokenizer:
    return SentencePieceTokenizer((demo_checkpoint / "tokenizer.model").read_bytes(), add_bos=True, bos_id=1, eos_ids=[2])


def make_seq(tok: Tokenizer, prompt: str, **sampling) -> Sequence:
    ids = tok.encode(prompt)
    return Sequence("r", ids, Sampling(**sampling), max_length=1000,
                    detokenizer=IncrementalDetokenizer(tok, ids), eos_ids=tok.eos_ids)


def stream(seq: Sequence, ids: list[int], per_call: int = 1) -> str:
    out = ""
    for i in range(0, len(ids), per_call):
        delta = seq.append(ids[i:i + per_call])
        if delta:
            out += delta.text
        if seq.finish:
            break
    return out


@pytest.mark.parametrize("text", ["Hello wörld, 日本語 🐉 and crème brûlée!", "  two  spaces", "→ ∑ ok ✓"])
@pytest.mark.parametrize("per_call", [1, 3])
def test_incremental_text_matches_full_decode(tok, text, per_call):
    prompt = tok.encode("The menu said:")
    ids = tok.sp.encode(text)
    assert any(tok.sp.is_byte(i) for i in ids) or "two" in text  # byte fallback is exercised
    seq = make_seq(tok, "The menu said:", max_tokens=100)
    got = stream(seq, ids, per_call)
    assert seq.finish == Finish.NONE
    full, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert got == full[len(head):]
    assert "\ufffd" not in got


def test_partial_character_is_held_until_complete(tok):
    seq = make_seq(tok, "x", max_tokens=100)
    dragon = tok.sp.encode("🐉")
    byte_ids = [i for i in dragon if tok.sp.is_byte(i)]
    assert len(byte_ids) == 4
    texts = [seq.append([i]).text for i in byte_ids[:3]]
    assert texts == ["", "", ""]
    assert seq.append([byte_ids[3]]).text.endswith("🐉")


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    seq = make_seq(tok, "Once", stop=("river ran",), max_tokens=100)
    ids = tok.sp.encode(" upon a time the river ran to the sea")
    got = stream(seq, ids)
    assert seq.finish == Finish.STOP and seq.stop_reason == "river ran"
    assert got == " upon a time the " and seq.text == got
    assert len(seq.output_ids) < len(ids)  # tokens after the stop are discarded


def test_stop_string_in_a_multi_token_delta_discards_the_rest(tok):
    seq = make_seq(tok, "Once", stop=("time",), max_tokens=100)
    ids = tok.sp.encode(" upon a time the river ran")
    delta = seq.append(ids)  # one multi-step call returning every id at once
    assert delta.finish == Finish.STOP and delta.text == " upon a "
    assert tok.decode(seq.output_ids).rstrip().endswith("time")


def test_eos_min_tokens_and_ignore_eos(tok):
    seq = make_seq(tok, "Once", max_tokens=10)
    assert seq.append([100, 2, 101]).finish == Finish.STOP and seq.output_ids == [100, 2]
    seq = make_seq(tok, "Once", max_tokens=10, min_tokens=3)
    seq.append([100, 2, 101, 2])
    assert seq.finish == Finish.STOP and seq.output_ids == [100, 2, 101, 2]
    seq = make_seq(tok, "Once", max_tokens=4, ignore_eos=True)
    seq.append([2, 2, 2, 2, 2])
    assert seq.finish == Finish.LENGTH and len(seq.output_ids) == 4


def test_stop_token_id_is_returned_and_named(tok):
    seq = make_seq(tok, "Once", max_tokens=10, stop_token_ids=frozenset({77}))
    delta = seq.append([5, 77, 6])
    assert delta.finish == Finish.STOP and delta.token_ids == [5, 77] and delta.stop_reason == "77"


def test_length_limit_of_context(tok):
    ids = tok.encode("Once")
    seq = Sequence("r", ids, Sampling(max_tokens=100), max_length=len(ids) + 2,
                   detokenizer=IncrementalDetokenizer(tok, ids), eos_ids=tok.eos_ids)
    seq.append([5, 6, 7])
    assert seq.finish == Finish.LENGTH and seq.output_ids == [5, 6]


def test_ids_beyond_the_tokenizer_decode_to_nothing(tok):
    seq = make_seq(tok, "Once", max_tokens=10)
    assert seq.append([tok.size + 5]).text == ""


def test_incremental_text_matches_full_decode_for_random_pieces(tok):
    """Any mix of ordinary, unknown and control pieces (the fast path and the slow one, a space after </s>) comes
    out as the full decode of the same ids."""
    rng = np.random.default_rng(0)
    pieces = [i for i in range(tok.size) if not tok.sp.is_byte(i)]
    for _ in range(100):
        prompt, ids = rng.choice(pieces, 6).tolist(), rng.choice(pieces, 30).tolist()
        detok = IncrementalDetokenizer(tok, prompt)
        got = "".join(detok.push_one(i, final=n == len(ids) - 1) for n, i in enumerate(ids))
        context = prompt[-5:]
        assert got == tok.decode(context + ids)[len(tok.decode(context)):]


def test_a_delta_names_its_sample_and_carries_no_logprobs_unasked(tok):
    ids = tok.encode("Once")
    for stop in ((), ("zz",)):  # the path without stop strings and the one with
        seq = Sequence("r", ids, Sampling(max_tokens=10, stop=stop), max_length=1000, index=3,
                       detokenizer=IncrementalDetokenizer(tok, ids), eos_ids=tok.eos_ids)
        delta = seq.append([5])
        assert delta.index == 3 and delta.logprobs is None and delta.token_ids == [5]


def test_deltas_a_stream_fell_behind_on_go_out_as_one_per_sample():
    from scheduler_svc.frontend import merge_deltas
    from scheduler_svc.sequence import Delta, Logprob

    lp = [Logprob(i, -1.0, 1, []) for i in range(4)]
    merged = merge_deltas([Delta([1], "a", index=0, logprobs=lp[:1]), Delta([2], "b", index=1),
                           Delta([3], "c", index=0, logprobs=lp[1:2]),
                           Delta([4], "d", Finish.STOP, "4", index=0, logprobs=lp[2:3])])
    assert [(d.index, d.token_ids, d.text, d.finish, d.stop_reason) for d in merged] == [
        (0, [1, 3, 4], "acd", Finish.STOP, "4"), (1, [2], "b", Finish.NONE, "")]
    assert merged[0].logprobs == lp[:3] and merged[1].logprobs is None
