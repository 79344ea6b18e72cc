"""Build small or TinyLlama-shaped Llama checkpoints in the Hugging Face layout, locally, with random weights.

The demo model lets `make run-worker` start without a download, the tests compare the engine against references
on a real checkpoint layout, and `make bench --shape tinyllama` measures what a 1.1B model costs (random weights
cost exactly what trained ones do). The tokenizer is a real SentencePiece model trained on shared/data.
"""
from __future__ import annotations

import argparse
import io
import json
import pathlib

import numpy as np

CORPUS = pathlib.Path(__file__).parent / "data" / "demo_corpus.txt"

SHAPES: dict[str, dict] = {
    # tiny enough that DEV=CPU compiles and runs it in seconds; GQA (4 query heads over 2 KV heads) on purpose
    "demo": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=None),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000),
}


# TinyLlama-1.1B-Chat's template (Zephyr style), with an error for roles it does not know
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% else %}\n"
    "{{ raise_exception('Only system, user and assistant roles are supported, not ' + message['role']) }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def train_tokenizer(vocab_size: int = 400) -> bytes:
    """A Llama-style SentencePiece BPE model (BOS=1, EOS=2, byte fallback) trained on the shipped corpus."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text(encoding="utf-8").splitlines()), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        minloglevel=2, num_threads=1)
    return model.getvalue()


def build_checkpoint(out_dir: str | pathlib.Path, shape: str = "demo", dtype: str = "float32", seed: int = 0,
                     tie_word_embeddings: bool = False, shards: int = 1) -> pathlib.Path:
    """Write config.json, tokenizer files and random weights (std chosen so logits are well spread)."""
    import sentencepiece as spm

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_bytes = train_tokenizer()
    (out / "tokenizer.model").write_bytes(tok_bytes)
    tok_vocab = spm.SentencePieceProcessor(model_proto=tok_bytes).get_piece_size()

    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size") or tok_vocab
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, rms_norm_eps=1e-5,
                  rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype=dtype,
                  tie_word_embeddings=tie_word_embeddings, attention_bias=False, **dims)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=2), indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
             tokenizer_class="LlamaTokenizer", legacy=False, model_max_length=dims["max_position_embeddings"],
             chat_template=CHAT_TEMPLATE),
        indent=2))

    write_random_weights(out, dims, vocab, dtype, seed, tie_word_embeddings, shards)
    return out


def write_random_weights(out: pathlib.Path, dims: dict, vocab: int, dtype: str, seed: int, tie_word_embeddings: bool,
                   shards: int) -> None:
    """Random weights in the Hugging Face names (std chosen so logits are well spread)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    D, F, L = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    hd = D // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * hd

    def rand(*shape_: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape_, dtype=np.float32) * std).astype(np_dtype)

    def norm_weight() -> np.ndarray:
        return (1.0 + rng.standard_normal(D, dtype=np.float32) * 0.1).astype(np_dtype)

    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, D, std=1.0),
                                      "model.norm.weight": norm_weight()}
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = rand(vocab, D, std=D ** -0.5)
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm_weight(),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "self_attn.q_proj.weight": rand(D, D, std=D ** -0.5),
            p + "self_attn.k_proj.weight": rand(kv, D, std=D ** -0.5),
            p + "self_attn.v_proj.weight": rand(kv, D, std=D ** -0.5),
            p + "self_attn.o_proj.weight": rand(D, D, std=D ** -0.5),
            p + "mlp.gate_proj.weight": rand(F, D, std=D ** -0.5),
            p + "mlp.up_proj.weight": rand(F, D, std=D ** -0.5),
            p + "mlp.down_proj.weight": rand(D, F, std=F ** -0.5),
        })
    _save(out, tensors, shards, save_file)


def _save(out: pathlib.Path, tensors: dict[str, np.ndarray], shards: int, save_file) -> None:
    """One model.safetensors, or `shards` files with the model.safetensors.index.json that transformers writes."""
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--dtype", choices=["float32", "float16"], default=None,
                    help="default: float32 for demo, float16 for tinyllama")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = args.dtype or ("float32" if args.shape == "demo" else "float16")
    path = build_checkpoint(args.out_dir, args.shape, dtype, args.seed)
    print(f"wrote {args.shape} checkpoint ({dtype}) to {path}")


if __name__ == "__main__":
    main()
