"""The batch shapes a worker captures graphs for, and their flag syntax. Imports no tinygrad, so flags can be
parsed before tinygrad reads its environment (BEAM, PARALLEL)."""
from __future__ import annotations

DEFAULT_DECODE_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DEFAULT_PREFILL_SHAPES = [(1, 128), (1, 512), (4, 128), (16, 128)]


def parse_int_list(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]: decode buckets."""
    return [int(x) for x in text.split(",") if x]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x128,4x128" -> [(1, 128), (4, 128)]: prefill buckets as rows x tokens."""
    out = []
    for part in text.split(","):
        rows, tokens = part.lower().split("x")
        out.append((int(rows), int(tokens)))
    return out
