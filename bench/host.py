"""`python -m bench.host`: the scheduler's host time per decode step with N running sequences, no worker.

One step is what the scheduler process does for one worker call of one decode step: plan it (admission, block
allocation, batch building), encode and serialize the ExecuteRequest, parse a response, apply the sampled tokens
(postprocess: stop checks, block registration and hashing, detokenizing) and build and serialize every stream's
GenerateResponse. The worker is replaced by a response of random token ids, so only host work is timed; the
event loop and gRPC's own transport are not. Issue #9's bar: at most 1 ms per step with 256 running sequences.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

DECODE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def measure(tokenizer_model: bytes, running: int, steps: int = 300, prompt_len: int = 100, vocab: int = 0,
            extras: bool = False) -> dict:
    """p50/p99 host milliseconds per decode step with `running` sequences decoding. extras: every sequence asks
    for penalties and 5 logprobs (the request carries the extra arrays, the response the logprobs)."""
    from scheduler_svc.block_manager import BlockManager
    from scheduler_svc.engine import encode_batch
    from scheduler_svc.scheduler import Scheduler
    from scheduler_svc.sequence import Sampling, Sequence
    from scheduler_svc.tokenizer import IncrementalDetokenizer, SentencePieceTokenizer
    from tinyvllm.v1 import scheduler_pb2, worker_pb2

    tok = SentencePieceTokenizer(tokenizer_model, True, 1, [2])
    # sampled ids: ordinary pieces, as text mostly is (random ids of a small demo vocabulary are mostly bytes)
    sp = tok.sp
    ordinary = np.array([i for i in range(vocab or tok.size)
                         if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))])
    block_size, width = 16, 128
    blocks = BlockManager(num_blocks=running * (prompt_len + steps + 64) // block_size + 8, block_size=block_size)
    sched = Scheduler(blocks, DECODE_BUCKETS, [(16, 128)], max_steps=1, stream_steps=1, join_steps=1, max_inflight=1,
                      num_slots=257)
    rng = np.random.default_rng(0)
    for i in range(running):
        prompt = rng.choice(ordinary, prompt_len).tolist()
        sampling = Sampling(max_tokens=10 ** 6, temperature=1.0, seed=i, ignore_eos=True)
        if extras:
            sampling.repetition_penalty, sampling.frequency_penalty, sampling.logprobs = 1.1, 0.2, 5
        sched.add(Sequence(f"r{i}", prompt, sampling, max_length=10 ** 6,
                           detokenizer=IncrementalDetokenizer(tok, prompt), eos_ids=tok.eos_ids))

    def step() -> tuple[bool, float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = sched.schedule()
        data = encode_batch(batch, width, "bench").SerializeToString()
        assert data
        sampled = rng.choice(ordinary, (batch.rows, batch.num_steps)).astype(np.int32)
        lp = None
        if batch.logprobs:  # chosen logprob, rank, 20 ids, 20 logprobs
            lp = -rng.random((batch.rows, batch.num_steps, 42)).astype(np.float32) * 10
            lp[..., 1] = rng.integers(1, 50, lp.shape[:2])
            lp[..., 2:22] = rng.choice(ordinary, (*lp.shape[:2], 20))
        raw = worker_pb2.ExecuteResponse(token_ids=sampled.tobytes(),
                                         logprobs=b"" if lp is None else lp.tobytes()).SerializeToString()
        response = worker_pb2.ExecuteResponse.FromString(raw)
        sampled = np.frombuffer(response.token_ids, np.int32).reshape(batch.rows, batch.num_steps)
        logprobs = (np.frombuffer(response.logprobs, np.float32).reshape(batch.rows, batch.num_steps, -1)
                    if response.logprobs else None)
        for seq, delta in sched.postprocess(batch, sampled, logprobs):
            msg = scheduler_pb2.GenerateResponse(request_id=seq.request_id, token_ids=delta.token_ids,
                                                 text=delta.text, finish_reason=int(delta.finish))
            if delta.logprobs:
                for lp_ in delta.logprobs:
                    entry = msg.logprobs.add(token_id=lp_.token_id, logprob=lp_.logprob, rank=lp_.rank,
                                             text=tok.texts[lp_.token_id])
                    for r, (t, v) in enumerate(lp_.top, 1):
                        entry.top.add(token_id=t, logprob=v, rank=r, text=tok.texts[t])
            msg.SerializeToString()
        return batch.is_prefill, time.perf_counter() - t0, time.thread_time() - c0

    while step()[0]:  # prefill every prompt first
        pass
    times, cpu = (np.array(t) * 1e3 for t in zip(*[step()[1:] for _ in range(steps)]))
    return dict(running=running, extras=extras, steps=steps, p50_ms=float(np.percentile(times, 50)),
                p99_ms=float(np.percentile(times, 99)), mean_ms=float(times.mean()),
                cpu_p50_ms=float(np.percentile(cpu, 50)))


def measure_all(tokenizer_model: bytes, counts=(64, 256), steps: int = 300) -> list[dict]:
    return [measure(tokenizer_model, n, steps, extras=e) for n in counts for e in (False, True)]


def print_rows(rows: list[dict]) -> None:
    print("\nscheduler host time per decode step (no worker):")
    print(f"{'running':>8} {'extras':>7} {'p50 ms':>8} {'p99 ms':>8} {'cpu p50':>8}")
    for r in rows:
        print(f"{r['running']:>8} {'yes' if r['extras'] else 'no':>7} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
              f" {r['cpu_p50_ms']:>8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", help="a tokenizer.model; default: the demo checkpoint's (built if missing)")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    path = pathlib.Path(args.tokenizer) if args.tokenizer else None
    if path is None:
        from shared.demo_checkpoint import build_checkpoint

        ckpt = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "bench-demo"
        if not (ckpt / "config.json").exists():
            build_checkpoint(ckpt, shape="demo", dtype="float32")
        path = ckpt / "tokenizer.model"
    print_rows(measure_all(path.read_bytes(), steps=args.steps))


if __name__ == "__main__":
    main()
