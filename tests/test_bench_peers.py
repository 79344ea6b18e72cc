"""The peers' outputs are parsed into the figures tinyvllm is compared on (bench/peers.py)."""
from __future__ import annotations

import pytest

from bench.peers import ours, parse_llamacpp, parse_torch_compile

LLAMA_CPP = """\
| model                          |       size |     params | backend    | ngl | fa |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | --: | -: | --------------: | -------------------: |
| llama 1B F16                   |   2.05 GiB |     1.10 B | CUDA       |  99 |  1 |           pp128 |     30000.00 ± 95.10 |
| llama 1B F16                   |   2.05 GiB |     1.10 B | CUDA       |  99 |  1 |           tg256 |        757.16 ± 1.23 |
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.005 | 25600.00 |    0.170 |   752.94 |    0.175 |  1462.86 |
|   128 |    128 |   64 |  16384 |    0.118 | 69600.00 |    0.417 | 19650.00 |    0.535 | 30624.30 |
"""


def test_llamacpp_rows_become_figures():
    rows = {r["figure"]: r["value"] for r in parse_llamacpp(LLAMA_CPP)}
    assert rows["decode_b1_tok_s"] == pytest.approx(757.16)
    assert rows["prefill_128_ms"] == pytest.approx(128 / 30000 * 1e3)
    assert rows["decode_b64_tok_s"] == pytest.approx(19650)
    assert rows["streams64_tok_s"] == pytest.approx(64 * 128 / 0.535)
    assert rows["prefill_64x128_tok_s"] == pytest.approx(69600)


def test_torch_compile_rows_and_our_figures():
    text = ("torch.compile + CUDA graph decode B=1: 1.460 ms/step, 685 tok/s (compile+warm-up 79 s)\n"
            "torch.compile + CUDA graph decode B=64: 8.030 ms/step, 7972 tok/s (compile+warm-up 40 s)\n")
    assert [(r["figure"], r["value"]) for r in parse_torch_compile(text)] == [
        ("decode_b1_tok_s", 685), ("decode_b64_tok_s", 7972)]
    report = {"scenarios": [{"scenario": "a: 1 stream", "output_tok_s": 500.0, "ttft_ms_p50": 20.0,
                             "ttft_idle_ms_p50": 19.0}, {"scenario": "b: 64 streams", "output_tok_s": 4000.0}],
              "worker": {"decode": [{"rows": 64, "tok_s": 9000.0}], "prefill": [{"tok_s": 8000.0}]}}
    assert ours(report) == {"decode_b1_tok_s": 500.0, "prefill_128_ms": 19.0, "streams64_tok_s": 4000.0,
                            "decode_b64_tok_s": 9000.0, "prefill_64x128_tok_s": 8000.0}
