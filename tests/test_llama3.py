"""A Llama-3.2-1B-style checkpoint (tied embeddings, llama3 rope scaling, byte-level BPE tokenizer.json only, chat
template in chat_template.jinja): tokenizer, detokenizer and template through the worker's and the scheduler's code,
logits against the NumPy reference and, where installed, transformers."""
from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.chat import ChatTemplate
from scheduler_svc.tokenizer import HFTokenizer, IncrementalDetokenizer, load_tokenizer
from shared.llama3_checkpoint import CHAT_TEMPLATE, build_llama3_checkpoint
from shared.llama_config import LlamaConfig
from tests.reference import NumpyLlama
from tests.test_forward import close, make_model, run
from tinyvllm.v1 import worker_pb2
from worker_svc.tokenizer_files import read_tokenizer_info

TEXTS = ["Once upon a time", "A fisherman named Tomás sat in the café.", "naïve — 日本語 ✓ 🙂", " two  spaces\tand\nlines"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, café?"},
            {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_llama3_checkpoint(tmp_path_factory.mktemp("llama3"), seed=3)


@pytest.fixture(scope="module")
def tok(llama3) -> HFTokenizer:
    """The scheduler's tokenizer, made from what the worker would send (WorkerInfo), as in Engine.start."""
    info = read_tokenizer_info(llama3, LlamaConfig.load(llama3))
    wire = worker_pb2.WorkerInfo(tokenizer_model=info.model_bytes, tokenizer_json=info.json_bytes,
                                 add_bos_token=info.add_bos, bos_token_id=info.bos_id, eos_token_ids=info.eos_ids)
    tokenizer = load_tokenizer(worker_pb2.WorkerInfo.FromString(wire.SerializeToString()))
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(llama3):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(llama3))


def test_worker_reads_tokenizer_json_and_template(llama3):
    cfg = LlamaConfig.load(llama3)
    info = read_tokenizer_info(llama3, cfg)
    assert info.model_bytes == b"" and info.json_bytes == (llama3 / "tokenizer.json").read_bytes()
    assert info.chat_template == CHAT_TEMPLATE  # from chat_template.jinja
    assert (info.bos_token, info.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert info.eos_ids == sorted(cfg.eos_token_ids) and len(info.eos_ids) == 2
    assert cfg.tie_word_embeddings and cfg.rope_scaling["rope_type"] == "llama3"


def test_encode_adds_bos_through_the_post_processor(tok):
    ids = tok.encode("Once upon a time")
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids) == "Once upon a time"  # BOS is special: not in the text
    assert tok.encode_rendered("<|eot_id|>Hi")[0] == max(tok.eos_ids)  # special tokens in text become their ids


def test_tokenizer_matches_transformers(tok, hf_tokenizer):
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer(text).input_ids
        assert tok.decode(tok.encode(text)) == hf_tokenizer.decode(tok.encode(text), skip_special_tokens=True)


def test_incremental_detokenization_never_splits_a_character(tok):
    prompt = tok.encode("Questions and answers:")
    for text in TEXTS:
        ids = tok.encode_rendered(text)
        assert len(ids) > len(text.encode("utf-8")) // 4  # characters outside the corpus are byte tokens
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.push_one(i, final=(n == len(ids) - 1)) for n, i in enumerate(ids)]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def _hf_ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tokenizer, add_generation_prompt):
    from shared.demo_checkpoint import CHAT_TEMPLATE as TINYLLAMA_TEMPLATE

    for source in (CHAT_TEMPLATE, TINYLLAMA_TEMPLATE):
        ours = ChatTemplate(source, hf_tokenizer.bos_token, hf_tokenizer.eos_token)
        text = ours.render(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert text == hf_tokenizer.apply_chat_template(MESSAGES, chat_template=source, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
        want = _hf_ids(hf_tokenizer.apply_chat_template(MESSAGES, chat_template=source, tokenize=True,
                                                        add_generation_prompt=add_generation_prompt))
        assert tok.encode_rendered(text) == want


def test_llama3_rope_scaling_is_in_effect(llama3):
    cfg = LlamaConfig.load(llama3)
    plain = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    scaled = np.array(cfg.rope_inv_freq())
    kept, divided = np.isclose(scaled, plain), np.isclose(scaled, plain / cfg.rope_scaling["factor"])
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands
    assert np.allclose(NumpyLlama(llama3)._inv_freq(cfg.head_dim), scaled)


def test_logits_match_numpy_reference_and_transformers(llama3):
    ref = NumpyLlama(llama3)
    vocab = ref.cfg["vocab_size"]
    ids = [int(x) for x in np.random.default_rng(0).integers(0, vocab, size=20)]
    want = ref.logits(ids)
    model = make_model(llama3)
    blocks = [5, 2]
    close(run(model, [(ids[:16], 0, blocks)], T=16)[0], want[15], 1e-4)
    for pos in range(16, 20):
        close(run(model, [([ids[pos]], pos, blocks)], T=1)[0], want[pos], 1e-4)
    try:
        import torch
        import transformers
    except ImportError:
        pytest.skip("transformers/torch not installed: checked against the NumPy reference only")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(llama3), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    close(want[19], hf_logits[19], 1e-4)  # the reference's tied head and llama3 rope are transformers'
    close(run(model, [([ids[19]], 19, blocks)], T=1)[0], hf_logits[19], 1e-4)
