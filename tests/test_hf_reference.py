"""Logits against Hugging Face transformers' LlamaForCausalLM, on checkpoints it saved itself (skipped without it)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_forward import close, make_model, run  # noqa: E402

CASES = {
    "fp32-untied": dict(dtype=torch.float32, tie=False, rope_scaling=None, rtol=1e-4),
    # bf16 weights are served in fp16; Llama 3's rope rescaling must match transformers' exactly
    "bf16-tied-llama3-rope": dict(dtype=torch.bfloat16, tie=True, rtol=3e-2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_checkpoint(request, tmp_path_factory):
    case = CASES[request.param]
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=case["tie"], rope_scaling=case["rope_scaling"], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises with std 0.02; widen so logits are well separated
        for p in model.parameters():
            p.mul_(10.0 if p.ndim > 1 else 1.0)
    model = model.to(case["dtype"])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return path, model, case["rtol"]


def test_logits_match_transformers(hf_checkpoint):
    path, hf_model, rtol = hf_checkpoint
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(3, 300, size=20)]
    with torch.no_grad():
        want = hf_model.float()(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    model = make_model(path)
    blocks = [4, 9]
    got = run(model, [(ids[:16], 0, blocks)], T=16)
    close(got[0], want[15], rtol)
    for pos in range(16, 20):
        got = run(model, [([ids[pos]], pos, blocks)], T=1)
        close(got[0], want[pos], rtol)
