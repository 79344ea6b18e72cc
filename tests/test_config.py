"""config.json parsing across transformers versions and rope variants."""
import math

import pytest

from shared.llama_config import LlamaConfig

BASE = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


def test_defaults_and_gqa():
    cfg = LlamaConfig.from_dict({**BASE, "num_key_value_heads": 1, "eos_token_id": [2, 7]})
    assert (cfg.head_dim, cfg.kv_dim, cfg.rope_theta, cfg.eos_token_ids) == (4, 4, 10000.0, (2, 7))
    assert cfg.rope_inv_freq() == pytest.approx([1.0, 0.01])


def test_rope_theta_and_scaling_in_either_place():
    old = LlamaConfig.from_dict({**BASE, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}})
    assert old.rope_inv_freq() == new.rope_inv_freq() == pytest.approx([0.5, 0.5 / math.sqrt(500.0)])
    plain = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 500.0


def test_unsupported_rope_scaling_is_refused():
    cfg = LlamaConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(NotImplementedError, match="yarn"):
        cfg.rope_inv_freq()
