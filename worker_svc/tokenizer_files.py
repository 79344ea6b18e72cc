"""What the worker tells the scheduler about the checkpoint's tokenizer: its file, how it adds BOS, which ids end
generation, and the chat template with the token strings templates use. The scheduler then needs no files."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from shared.llama_config import LlamaConfig


@dataclass
class TokenizerInfo:
    model_bytes: bytes  # tokenizer.model (SentencePiece), or b"" when the checkpoint ships only tokenizer.json
    json_bytes: bytes  # tokenizer.json (Hugging Face tokenizers), sent only when there is no tokenizer.model
    add_bos: bool
    bos_id: int
    eos_ids: list[int]
    chat_template: str  # "" when the checkpoint has none
    bos_token: str  # "" when tokenizer_config.json does not name it
    eos_token: str


def _token_string(value) -> str:
    """tokenizer_config.json writes special tokens as strings, or (older files) as AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def chat_template(checkpoint: pathlib.Path, tok_cfg: dict) -> str:
    """chat_template.jinja wins over tokenizer_config.json's chat_template, as in transformers; a list of named
    templates (some checkpoints ship several) gives the one named "default"."""
    jinja = checkpoint / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template") or ""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template", "") for t in template}
        template = named.get("default") or next(iter(named.values()), "")
    return template


def read_tokenizer_info(checkpoint: pathlib.Path, config: LlamaConfig) -> TokenizerInfo:
    """tokenizer.model (or tokenizer.json) plus how the checkpoint's tokenizer adds BOS and which ids end
    generation."""
    tok_cfg_path, gen_cfg_path = checkpoint / "tokenizer_config.json", checkpoint / "generation_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    gen_cfg = json.loads(gen_cfg_path.read_text()) if gen_cfg_path.exists() else {}
    eos = gen_cfg.get("eos_token_id", list(config.eos_token_ids))
    eos_ids = sorted(set((eos if isinstance(eos, list) else [eos]) + list(config.eos_token_ids)))
    bos = config.bos_token_id if config.bos_token_id is not None else gen_cfg.get("bos_token_id", 1)
    sp_path, json_path = checkpoint / "tokenizer.model", checkpoint / "tokenizer.json"
    if sp_path.exists():
        model_bytes, json_bytes = sp_path.read_bytes(), b""
    elif json_path.exists():
        model_bytes, json_bytes = b"", json_path.read_bytes()
    else:
        raise FileNotFoundError(f"{checkpoint} has neither tokenizer.model nor tokenizer.json")
    return TokenizerInfo(model_bytes=model_bytes, json_bytes=json_bytes,
                         add_bos=bool(tok_cfg.get("add_bos_token", True)), bos_id=int(bos), eos_ids=eos_ids,
                         chat_template=chat_template(checkpoint, tok_cfg),
                         bos_token=_token_string(tok_cfg.get("bos_token")),
                         eos_token=_token_string(tok_cfg.get("eos_token")))
