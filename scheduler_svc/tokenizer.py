"""Tokenization (SentencePiece for tokenizer.model, Hugging Face `tokenizers` for tokenizer.json) and incremental
detokenization that never splits a character."""
from __future__ import annotations

import re
from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context, so the first output token keeps its leading space


class Tokenizer(Protocol):
    """What the scheduler needs of a checkpoint's tokenizer, whichever library reads it."""

    bos_id: int
    eos_ids: frozenset[int]
    size: int

    def encode(self, text: str) -> list[int]:
        """A prompt as the checkpoint's tokenizer encodes it (BOS added the way it adds it)."""

    def encode_rendered(self, text: str) -> list[int]:
        """Text a chat template rendered: no BOS added (the template writes it), and special tokens written in the
        text (`<s>`, `<|eot_id|>`) become their ids, as transformers' apply_chat_template(tokenize=True) does."""

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens left out."""

    def token_text(self, token_id: int) -> str:
        """The token's own string (`</s>`, `<|end_of_text|>`): what a template's bos_token / eos_token names."""

    pieces: "PieceTexts"  # the detokenizer's fast path
    texts: "TokenTexts"  # decode([id]) of each id, cached


class PieceTexts(dict):
    """Token id -> the text the token adds after an ordinary token, or None where that depends on its neighbours
    (byte pieces of a multi-byte character, special and out-of-range ids, SentencePiece's leading space at the
    start of a text). Filled on first use, so a 128k vocabulary costs nothing at start: the detokenizer's common
    case (an ordinary token after an ordinary one) becomes a dictionary lookup instead of two decode calls."""

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__()
        self.tok = tokenizer
        # two unrelated one-token texts as left context: a token is ordinary if it adds the same text after both
        self.contexts = [(ids, tokenizer.decode(ids)) for ids in
                         ([tokenizer.encode_rendered(t)[-1]] for t in ("a", "."))]

    def __missing__(self, token_id: int) -> str | None:
        texts = set()
        for ids, text in self.contexts:
            full = self.tok.decode([*ids, token_id])
            texts.add(full[len(text):] if full.startswith(text) else None)
        text = texts.pop() if len(texts) == 1 else None
        if not text or REPLACEMENT in text:
            text = None
        self[token_id] = text
        return text


class TokenTexts(dict):
    """Token id -> decode([id]), the text a logprob entry shows for it; filled on first use."""

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__()
        self.decode = tokenizer.decode

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self.decode([token_id])
        return text


class SentencePieceTokenizer:
    """tokenizer.model: Llama 1/2, TinyLlama, Mistral."""

    def __init__(self, model_bytes: bytes, add_bos: bool, bos_id: int, eos_ids: list[int]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.add_bos, self.bos_id, self.eos_ids = add_bos, bos_id, frozenset(eos_ids)
        self.size = self.sp.get_piece_size()
        # control pieces (<s>, </s>) and user-defined ones: SentencePiece's encode() treats them as plain text
        specials = [self.sp.id_to_piece(i) for i in range(self.size)
                    if self.sp.is_control(i) or self.sp.is_unknown(i) or _is_user_defined(self.sp, i)]
        self._special_ids = {p: self.sp.piece_to_id(p) for p in specials if p}
        alternatives = "|".join(re.escape(p) for p in sorted(self._special_ids, key=len, reverse=True))
        self._special_re = re.compile(f"({alternatives})") if alternatives else None
        self.pieces, self.texts = PieceTexts(self), TokenTexts(self)

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_rendered(self, text: str) -> list[int]:
        if self._special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # a captured special token
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        # a checkpoint's embedding may be larger than its tokenizer (padded vocabularies): those ids have no text
        return self.sp.decode([i for i in ids if 0 <= i < self.size])

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.size else ""


def _is_user_defined(sp, i: int) -> bool:
    return bool(getattr(sp, "is_user_defined", lambda _: False)(i))


class HFTokenizer:
    """tokenizer.json (Llama 3 and most newer checkpoints): the file decides BOS (its post-processor), byte-level
    pre-tokenization and which added tokens are special."""

    def __init__(self, json_bytes: bytes, bos_id: int, eos_ids: list[int]):
        from tokenizers import Tokenizer as HFTokenizerImpl

        self.tok = HFTokenizerImpl.from_str(json_bytes.decode("utf-8"))
        self.bos_id, self.eos_ids = bos_id, frozenset(eos_ids)
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        self.pieces, self.texts = PieceTexts(self), TokenTexts(self)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_rendered(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # added tokens in the text are still matched

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if 0 <= i < self.size], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""


def load_tokenizer(info) -> Tokenizer:
    """The tokenizer a worker sent (WorkerInfo): tokenizer.model when it has one, else tokenizer.json."""
    eos = list(info.eos_token_ids)
    if info.tokenizer_model:
        return SentencePieceTokenizer(info.tokenizer_model, info.add_bos_token, info.bos_token_id, eos)
    if info.tokenizer_json:
        return HFTokenizer(info.tokenizer_json, info.bos_token_id, eos)
    raise ValueError("the worker sent no tokenizer (the checkpoint has neither tokenizer.model nor tokenizer.json)")


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, decoding only a short window each time.

    The window starts at the tokens before the last emitted ones, so SentencePiece's leading-space rule and
    multi-token characters (byte fallback, byte-level BPE) come out exactly as in a full decode; a delta that ends
    in an incomplete UTF-8 character is held until the character completes."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.pieces = tokenizer.pieces
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # everything is emitted and the last id is ordinary: an ordinary next id adds exactly its piece text
        self.clean = bool(self.ids) and self.pieces[self.ids[-1]] is not None

    def push_one(self, token_id: int, final: bool = False) -> str:
        """push([token_id]), a dictionary lookup in the common case."""
        if self.clean and (text := self.pieces[token_id]) is not None:
            self.ids.append(token_id)
            self.prefix_offset = self.read_offset
            self.read_offset += 1
            if self.prefix_offset > 64:
                self._trim()
            return text
        return self.push([token_id], final)

    def push_many(self, new_ids: list[int]) -> str:
        """The text of several ids none of which is final: one lookup each when all are ordinary."""
        if self.clean:
            pieces = self.pieces
            texts = [pieces[i] for i in new_ids]
            if None not in texts:
                self.ids += new_ids
                self.read_offset += len(new_ids)
                self.prefix_offset = self.read_offset - 1
                if self.prefix_offset > 64:
                    self._trim()
                return "".join(texts)
        return "".join([self.push_one(i) for i in new_ids])

    def push(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tok.decode(self.ids[self.prefix_offset:])
        if full_text.endswith(REPLACEMENT) and not final:
            self.clean = False
            return ""
        delta = full_text[len(prefix_text):]
        if delta:  # ids that add no text (special tokens) stay in the window: the next piece's space depends on it
            self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.clean = self.pieces[self.ids[-1]] is not None
        if self.prefix_offset > 64:
            self._trim()
        return delta

    def _trim(self) -> None:
        """Keeps the window short: drops ids that can no longer influence decoding."""
        self.ids = self.ids[self.prefix_offset:]
        self.read_offset -= self.prefix_offset
        self.prefix_offset = 0
