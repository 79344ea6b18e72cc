"""Peer: Hugging Face transformers `generate` (eager, greedy) on the same checkpoint and shapes, same GPU."""
from __future__ import annotations

import time


def available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run(checkpoint: str, cases: list[tuple[int, int, int]]) -> list[dict]:
    """cases: (batch, prompt_len, new_tokens). Returns output tok/s and TTFT (a 1-token generate) per case."""
    import torch
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size

    def timed(ids, new: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    out = []
    with torch.inference_mode():
        for batch, prompt_len, new in cases:
            ids = torch.randint(3, vocab, (batch, prompt_len), device=dev)
            timed(ids, 4)  # warm-up
            ttft = timed(ids, 1)
            t = timed(ids, new)
            out.append(dict(peer="hf generate (eager)", batch=batch, prompt=prompt_len, new=new,
                            output_tok_s=batch * new / t, ttft_ms=ttft * 1e3, device=dev))
    del model
    return out
