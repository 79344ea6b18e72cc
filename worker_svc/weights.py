"""Load a Hugging Face Llama checkpoint (safetensors, single or sharded) onto the device, once."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.nn.state import safe_load

from shared.llama_config import LlamaConfig


@dataclass
class LayerWeights:
    """One decoder layer; q/k/v and gate/up are concatenated so each is one matmul per step."""

    attn_norm: Tensor
    wqkv: Tensor  # (q_dim + 2 * kv_dim, hidden)
    wo: Tensor
    mlp_norm: Tensor
    w_gate_up: Tensor  # (2 * intermediate, hidden)
    w_down: Tensor


@dataclass
class LlamaWeights:
    embed: Tensor
    layers: list[LayerWeights]
    norm: Tensor
    lm_head: Tensor  # the same tensor as `embed` when the checkpoint ties them

    def tensors(self) -> list[Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out += [layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down]
        return out

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in {id(t): t for t in self.tensors()}.values())


def compute_dtype_for(config: LlamaConfig, requested: str = "auto") -> DType:
    """fp32 checkpoints run in fp32; fp16 and bf16 ones in fp16, which every tinygrad backend handles well."""
    name = config.torch_dtype if requested == "auto" else requested
    return dtypes.float32 if name in ("float32", "float") else dtypes.float16


def _open_checkpoint(checkpoint_dir: pathlib.Path) -> dict[str, Tensor]:
    """Disk-backed tensors for every name in the checkpoint, whether it is one file or an indexed set of shards."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(safe_load(checkpoint_dir / name))
    return state


def load_weights(checkpoint_dir: str | pathlib.Path, config: LlamaConfig, dtype: DType,
                 device: str | None = None) -> LlamaWeights:
    """Read every tensor from disk, cast and fuse it on the device and realize it there; nothing moves again."""
    device = device or Device.DEFAULT
    raw = _open_checkpoint(pathlib.Path(checkpoint_dir))

    def take(name: str) -> Tensor:
        if name not in raw:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        t = raw[name]
        if t.dtype == dtypes.bfloat16:
            # bf16 is the top half of an fp32: widen with integer ops, which every backend compiles (tinygrad's
            # clang backend cannot convert __bf16, so TinyLlama's bf16 weights would not load on DEV=CPU)
            return (t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32) << 16).bitcast(dtypes.float32).cast(dtype)
        return t.to(device).cast(dtype)

    def fused(*names: str) -> Tensor:
        return Tensor.cat(*[take(n) for n in names], dim=0).contiguous()

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = LayerWeights(
            attn_norm=take(p + "input_layernorm.weight").contiguous(),
            wqkv=fused(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
            wo=take(p + "self_attn.o_proj.weight").contiguous(),
            mlp_norm=take(p + "post_attention_layernorm.weight").contiguous(),
            w_gate_up=fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            w_down=take(p + "mlp.down_proj.weight").contiguous(),
        )
        Tensor.realize(layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down)
        layers.append(layer)
    embed = take("model.embed_tokens.weight").contiguous().realize()
    if "lm_head.weight" in raw and not config.tie_word_embeddings:
        lm_head = take("lm_head.weight").contiguous().realize()
    else:
        lm_head = embed
    norm = take("model.norm.weight").contiguous().realize()
    return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)
