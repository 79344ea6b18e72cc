"""A Llama-3.2-1B-style checkpoint, built locally with random weights: what the Llama 3 family ships that the demo
checkpoint does not. Tied embeddings, Llama 3 rope scaling (all three frequency bands in use at this head size),
GQA, a byte-level BPE tokenizer.json trained with Hugging Face `tokenizers` (no tokenizer.model), special tokens
after the vocabulary, BOS added by the tokenizer's post-processor, two EOS ids, and Llama 3's chat template in
chat_template.jinja."""
from __future__ import annotations

import argparse
import json
import pathlib

from shared.demo_checkpoint import CORPUS, write_random_weights

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's chat template (Meta-Llama-3-8B-Instruct)
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
# head_dim 16 and rope_theta 500000 give wavelengths 6, 33, 168, ...: with an original context of 64, one band is
# kept, one smoothed and the rest divided by `factor`
ROPE_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)


def train_tokenizer(vocab_size: int = 512) -> str:
    """tokenizer.json text: byte-level BPE on the shipped corpus, Llama 3's special tokens appended after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok.to_str()


def build_llama3_checkpoint(out_dir: str | pathlib.Path, seed: int = 0, dtype: str = "float32") -> pathlib.Path:
    from tokenizers import Tokenizer

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_json = train_tokenizer()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok = Tokenizer.from_str(tok_json)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    bos, eos, eot = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling=ROPE_SCALING, hidden_act="silu", bos_token_id=bos,
                  eos_token_id=[eos, eot], torch_dtype=dtype, tie_word_embeddings=True, attention_bias=False,
                  head_dim=DIMS["hidden_size"] // DIMS["num_attention_heads"], **DIMS)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(dict(bos_token_id=bos, eos_token_id=[eos, eot]), indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", tokenizer_class="PreTrainedTokenizerFast",
             clean_up_tokenization_spaces=False, model_max_length=DIMS["max_position_embeddings"]), indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    write_random_weights(out, DIMS, vocab, dtype, seed, tie_word_embeddings=True, shards=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"wrote a Llama-3-style checkpoint to {build_llama3_checkpoint(args.out_dir, args.seed)}")


if __name__ == "__main__":
    main()
