"""Peers measured in the same run as tinyvllm, on the same GPU, so that every figure can be given as a ratio.

- `llamacpp`: llama.cpp with CUDA on an F16 GGUF of the same checkpoint (../shared/peers/llamacpp/run.sh builds it,
  6-10 minutes on the GPU machine; start it early with `--build-only`), llama-bench and llama-batched-bench.
- `torch-compile`: the gpt-fast recipe (torch.compile + one CUDA graph per decode step), TinyLlama shape.
- `hf`: Hugging Face `generate`, eager (bench.peer_hf).
Each returns rows {peer, figure, value, unit}; `figure` names what tinyvllm figure it compares with (FIGURES).
"""
from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
# where the peer programs are: ../shared/peers beside the checkout, or a copy carried into .peers/
PEERS_DIRS = [ROOT.parent / "shared" / "peers", ROOT / ".peers"]
# figure -> (what it is, higher is better)
FIGURES = {
    "decode_b1_tok_s": ("batch-1 decode tok/s (ours: scenario a)", True),
    "decode_b64_tok_s": ("batch-64 decode tok/s (ours: worker only)", True),
    "streams64_tok_s": ("64 streams 128/128 output tok/s incl. prefill (ours: scenario b)", True),
    "prefill_128_ms": ("one 128-token prefill, ms (ours: TTFT idle p50)", False),
    "prefill_64x128_tok_s": ("prefill of 64 x 128 tokens, tok/s (ours: worker-only prefill, best bucket)", True),
}


def peers_dir() -> pathlib.Path:
    return next((d for d in PEERS_DIRS if d.is_dir()), PEERS_DIRS[0])


def _run(cmd: list[str], timeout_s: float) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def parse_llamacpp(text: str) -> list[dict]:
    """llama-bench rows (`| ... | pp128 | 30000.00 ± 10.00 |`) and llama-batched-bench rows (`| PP | TG | B | ...`)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"(pp|tg)\d+", cells[-2]):
            tok_s = float(cells[-1].split("±")[0])
            if cells[-2] == "tg256":
                rows.append(dict(figure="decode_b1_tok_s", value=tok_s, unit="tok/s", source="llama-bench tg256"))
            elif cells[-2] == "pp128":
                rows.append(dict(figure="prefill_128_ms", value=128 / tok_s * 1e3, unit="ms",
                                 source="llama-bench pp128"))
        elif len(cells) == 10 and all(re.fullmatch(r"[\d.]+", c) for c in cells):
            pp, tg, b, _, t_pp, s_pp, t_tg, s_tg, t_all, _ = (float(c) for c in cells)
            if int(b) == 64:
                src = f"llama-batched-bench {int(b)} x {int(pp)}/{int(tg)}"
                rows += [dict(figure="decode_b64_tok_s", value=s_tg, unit="tok/s", source=src),
                         dict(figure="streams64_tok_s", value=b * tg / t_all, unit="tok/s", source=src),
                         dict(figure="prefill_64x128_tok_s", value=s_pp, unit="tok/s", source=src)]
    return [dict(peer="llama.cpp", **r) for r in rows]


def llamacpp(checkpoint: str, src_tgz: str) -> list[dict]:
    script = peers_dir() / "llamacpp" / "run.sh"
    return parse_llamacpp(_run(["bash", str(script), src_tgz, checkpoint], timeout_s=1500))


def parse_torch_compile(text: str) -> list[dict]:
    rows = []
    for m in re.finditer(r"B=(\d+): ([\d.]+) ms/step, (\d+) tok/s \(compile\+warm-up (\d+) s\)", text):
        batch, tok_s = int(m[1]), float(m[3])
        figure = {1: "decode_b1_tok_s", 64: "decode_b64_tok_s"}.get(batch)
        if figure:
            rows.append(dict(peer="torch.compile", figure=figure, value=tok_s, unit="tok/s",
                             source=f"decode step B={batch}, compile {m[4]} s"))
    return rows


def torch_compile() -> list[dict]:
    import sys

    return parse_torch_compile(_run([sys.executable, str(peers_dir() / "torch_compile_decode.py"), "1", "64"],
                                    timeout_s=900))


def ours(report: dict) -> dict[str, float]:
    """tinyvllm's value of each figure in a bench report (where measured)."""
    values: dict[str, float] = {}
    scenarios = {s["scenario"][0]: s for s in report.get("scenarios", [])}
    if "a" in scenarios:
        values["decode_b1_tok_s"] = scenarios["a"]["output_tok_s"]
        values["prefill_128_ms"] = scenarios["a"].get("ttft_idle_ms_p50") or scenarios["a"]["ttft_ms_p50"]
    if "b" in scenarios:
        values["streams64_tok_s"] = scenarios["b"]["output_tok_s"]
    worker = report.get("worker", {})
    for d in worker.get("decode", []):
        if d["rows"] == 64:
            values["decode_b64_tok_s"] = d["tok_s"]
    if worker.get("prefill"):
        values["prefill_64x128_tok_s"] = max(p["tok_s"] for p in worker["prefill"])
    return values


def print_ratios(report: dict) -> None:
    mine = ours(report)
    print(f"\n{'figure':<72} {'tinyvllm':>10} {'peer':>10}  ratio (>1: tinyvllm better)")
    for row in report.get("peers", []):
        name, higher_better = FIGURES[row["figure"]]
        us = mine.get(row["figure"])
        ratio = "" if us is None else f"{(us / row['value'] if higher_better else row['value'] / us):.2f}x"
        print(f"{name + ' vs ' + row['peer']:<72} {'-' if us is None else f'{us:.1f}':>10} "
              f"{row['value']:>10.1f}  {ratio}  ({row['source']})")
