"""An independent Llama forward pass in plain NumPy (float64), written from the architecture's definition.

It reads the checkpoint's safetensors directly and recomputes full causal attention over the whole sequence,
so it shares no code with the engine: no paged cache, no fused weights, no tinygrad."""
from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors.numpy import load_file


class NumpyLlama:
    def __init__(self, checkpoint_dir: str | pathlib.Path):
        path = pathlib.Path(checkpoint_dir)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w: dict[str, np.ndarray] = {}
        for f in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
        if "lm_head.weight" not in self.w or self.cfg.get("tie_word_embeddings"):
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["rms_norm_eps"]) * weight

    def _inv_freq(self, hd: int) -> np.ndarray:
        """Rotary frequencies; Llama 3 scaling as Meta's reference code writes it (apply_scaling in llama/model.py),
        vectorised: short wavelengths kept, long ones divided by `factor`, a linear blend in between."""
        inv_freq = 1.0 / (self.cfg.get("rope_theta", 10000.0) ** (np.arange(0, hd, 2) / hd))
        scaling = self.cfg.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            assert not scaling, f"the reference knows no rope scaling {scaling}"
            return inv_freq
        factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
        wavelen = 2 * np.pi / inv_freq
        smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(wavelen < high_wavelen, inv_freq, np.where(wavelen > low_wavelen, inv_freq / factor, blended))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits (len(token_ids), vocab) for every position of one sequence."""
        c, w = self.cfg, self.w
        n_heads, n_kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        hd = c.get("head_dim") or c["hidden_size"] // n_heads
        T = len(token_ids)
        x = w["model.embed_tokens.weight"][np.array(token_ids)]
        inv_freq = self._inv_freq(hd)
        angles = np.outer(np.arange(T), inv_freq)
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

        def rope(t: np.ndarray) -> np.ndarray:  # t: (T, heads, hd), rotate-half pairing
            a, b = t[..., : hd // 2], t[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

        causal = np.tril(np.ones((T, T), dtype=bool))
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, n_heads, hd))
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, n_kv, hd))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, n_kv, hd)
            k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            scores = np.where(causal[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", probs, v).reshape(T, n_heads * hd)
            x = x + attn @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        return self._norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
