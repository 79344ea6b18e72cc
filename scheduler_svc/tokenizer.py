"""SentencePiece tokenization and incremental detokenization that never splits a character."""
from __future__ import annotations

import sentencepiece as spm

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context, so the first output token keeps its leading space


class Tokenizer:
    def __init__(self, model_bytes: bytes, add_bos: bool, bos_id: int, eos_ids: list[int]):
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.add_bos, self.bos_id, self.eos_ids = add_bos, bos_id, frozenset(eos_ids)
        self.size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Like the checkpoint's tokenizer: SentencePiece ids, with BOS first when the tokenizer adds it."""
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        # a checkpoint's embedding may be larger than its tokenizer (padded vocabularies): those ids have no text
        return self.sp.decode([i for i in ids if 0 <= i < self.size])


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, decoding only a short window each time.

    The window starts at the tokens before the last emitted ones, so SentencePiece's leading-space rule and
    multi-token characters (byte fallback) come out exactly as in a full decode; a delta that ends in an
    incomplete UTF-8 character is held until the character completes."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tok.decode(self.ids[self.prefix_offset:])
        if full_text.endswith(REPLACEMENT) and not final:
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # keep the window short: drop ids that can no longer influence decoding
        if self.prefix_offset > 64:
            self.ids = self.ids[self.prefix_offset:]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return delta
