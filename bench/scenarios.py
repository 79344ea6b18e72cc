"""Load scenarios driven through the scheduler's public gRPC API, as a client would."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np

from tinyvllm.v1 import scheduler_pb2 as pb
from tinyvllm.v1 import scheduler_pb2_grpc


@dataclass
class Timing:
    ttft: float
    tpot: float | None
    tokens: int
    end: float


async def one(stub, prompt_ids: list[int], max_tokens: int) -> Timing:
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                             params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    t0, first, n = time.perf_counter(), None, 0
    async for msg in stub.Generate(req):
        if msg.token_ids and first is None:
            first = time.perf_counter()
        n += len(msg.token_ids)
    end = time.perf_counter()
    return Timing(ttft=first - t0, tpot=(end - first) / (n - 1) if n > 1 else None, tokens=n, end=end)


def summarize(name: str, timings: list[Timing], wall: float) -> dict:
    ttft = np.array([t.ttft for t in timings]) * 1e3
    tpot = np.array([t.tpot for t in timings if t.tpot is not None]) * 1e3
    tokens = sum(t.tokens for t in timings)
    return dict(scenario=name, requests=len(timings), output_tokens=tokens, wall_s=wall,
                output_tok_s=tokens / wall, requests_s=len(timings) / wall,
                ttft_ms_p50=float(np.percentile(ttft, 50)), ttft_ms_p99=float(np.percentile(ttft, 99)),
                tpot_ms_p50=float(np.percentile(tpot, 50)), tpot_ms_p99=float(np.percentile(tpot, 99)))


async def run_batch(stub, prompts: list[list[int]], outs: list[int]) -> tuple[list[Timing], float]:
    t0 = time.perf_counter()
    timings = await asyncio.gather(*(one(stub, p, n) for p, n in zip(prompts, outs)))
    return list(timings), time.perf_counter() - t0


async def idle_ttft(stub, prompt_ids: list[int]) -> tuple[float, float, float]:
    """One request for one token on an idle server: (TTFT at the client, the scheduler's worker calls from send
    to answer, the worker's own time in them). What TTFT spends outside the calls is the scheduler's and the
    client's; what the calls spend outside the worker's time is gRPC and the worker's request handling."""
    before = await stub.GetServerInfo(pb.GetServerInfoRequest())
    ttft = (await run_batch(stub, [prompt_ids], [1]))[0][0].ttft
    after = await stub.GetServerInfo(pb.GetServerInfoRequest())
    return (ttft, after.stats.worker_call_seconds - before.stats.worker_call_seconds,
            after.stats.worker_busy_seconds - before.stats.worker_busy_seconds)


async def run_scenarios(address: str, which: str, vocab: int, max_context: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def prompt(n: int) -> list[int]:
        return [1, *rng.integers(3, min(vocab, 32000), size=n - 1).tolist()]

    results = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        # warm the path once (first requests pay Python imports and connection set-up)
        await run_batch(stub, [prompt(16)], [4])
        for name in which.split(","):
            before = await stub.GetServerInfo(pb.GetServerInfoRequest())
            started = time.perf_counter()
            if name == "a":  # one stream, 128 in, 256 out; best of 3 runs by TPOT
                runs = [await run_batch(stub, [prompt(128)], [256]) for _ in range(3)]
                timings, wall = min(runs, key=lambda r: r[0][0].tpot)
                idle = [await idle_ttft(stub, prompt(128)) for _ in range(5)]
                summary = summarize("a: 1 stream 128/256", timings, wall)
                for i, key in enumerate(("ttft_idle_ms_p50", "ttft_idle_call_ms_p50", "ttft_idle_worker_ms_p50")):
                    summary[key] = float(np.median([t[i] for t in idle]) * 1e3)
            elif name == "b":  # 64 concurrent streams, 128 in, 128 out
                timings, wall = await run_batch(stub, [prompt(128) for _ in range(64)], [128] * 64)
                summary = summarize("b: 64 streams 128/128", timings, wall)
            elif name == "c":  # 256 requests at once, seeded random lengths
                lens = rng.integers(16, min(512, max_context // 2), size=256)
                outs = rng.integers(16, min(256, max_context // 2), size=256)
                timings, wall = await run_batch(stub, [prompt(int(n)) for n in lens], outs.tolist())
                summary = summarize("c: 256 mixed at once", timings, wall)
            else:
                raise ValueError(f"unknown scenario {name!r}")
            elapsed = time.perf_counter() - started
            after = await stub.GetServerInfo(pb.GetServerInfoRequest())
            calls = after.stats.worker_calls - before.stats.worker_calls
            call_s = after.stats.worker_call_seconds - before.stats.worker_call_seconds
            busy_s = after.stats.worker_busy_seconds - before.stats.worker_busy_seconds
            summary.update(worker_calls=calls, grpc_share_of_call=(call_s - busy_s) / call_s if call_s else None,
                           worker_busy_share_of_wall=busy_s / elapsed,
                           preemptions=after.stats.preemptions - before.stats.preemptions)
            results.append(summary)
    return results
