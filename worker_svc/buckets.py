"""The batch shapes a worker captures graphs for, and their flag syntax. Imports no tinygrad, so flags can be
parsed before tinygrad reads its environment (BEAM, PARALLEL)."""
from __future__ import annotations

# Few buckets: each is two graphs to compile at start (10-20 s a bucket at the TinyLlama shape on an H200), and
# padding a batch to the next one costs little (a padding row's attention reads one slot). Measured on an H200 at
# the TinyLlama shape (bench/results/h200-bench-2026-11-27-aff2d43.log), the buckets left out were slower than the
# ones that replace them: a batch-4 step took 29.4 ms (matrix-vector kernels at 4 rows; 16 rows run split-K on
# tensor cores in 3.9 ms), a 4x128 prefill 62 ms and a 1x512 one 44 ms, where four 1x128 calls take 37 ms.
DEFAULT_DECODE_BATCH_SIZES = [1, 16, 64, 256]
DEFAULT_PREFILL_SHAPES = [(1, 128), (16, 128)]


def parse_int_list(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]: decode buckets."""
    return [int(x) for x in text.split(",") if x]


def format_int_list(values: list[int]) -> str:
    return ",".join(map(str, values))


def format_shapes(shapes: list[tuple[int, int]]) -> str:
    return ",".join(f"{rows}x{tokens}" for rows, tokens in shapes)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x128,4x128" -> [(1, 128), (4, 128)]: prefill buckets as rows x tokens."""
    out = []
    for part in text.split(","):
        rows, tokens = part.lower().split("x")
        out.append((int(rows), int(tokens)))
    return out
