"""A bounded soak: 2,000 randomized requests (lengths, sampling, stop strings, cancellations, aborts, a few bad
ones) through the session's services. Nothing is lost, every stream ends cleanly, greedy streams are exact, no
KV block leaks, and the scheduler's memory is back near where it started."""
from __future__ import annotations

import asyncio
import pathlib
import random
import time
import uuid
from dataclasses import dataclass

import grpc

from tests.test_integration import PROMPTS, generate, params, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb

N = 2000
CONCURRENCY = 48
WORDS = "the a river dragon story time once upon small server cache block quick brown fox ran old clock".split()
REF_TOKENS = 6


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


@dataclass
class Spec:
    kind: str  # "greedy" (exact, compared with a solo run), "sampled", "cancel", "abort", "bad"
    request: pb.GenerateRequest
    delay: float = 0.0  # for cancel and abort: when


def make_spec(i: int, rng: random.Random, vocab: int) -> Spec:
    rid = f"soak-{i}-{uuid.uuid4().hex[:6]}"
    roll = rng.random()
    if roll < 0.25:  # greedy on a known prompt, no stop: must equal the solo run's first tokens
        p = params(max_tokens=rng.randint(1, REF_TOKENS), temperature=0, ignore_eos=True)
        return Spec("greedy", pb.GenerateRequest(request_id=rid, prompt=PROMPTS[i % len(PROMPTS)], params=p))
    if roll < 0.02 + 0.25:  # bad requests: refused with INVALID_ARGUMENT, nothing else disturbed
        bad = rng.choice([params(max_tokens=0), params(top_p=0), params(temperature=-1), params(stop=[""]),
                          params(min_tokens=9, max_tokens=2)])
        return Spec("bad", pb.GenerateRequest(request_id=rid, prompt="x", params=bad))
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    kw: dict = dict(max_tokens=rng.randint(1, 8))
    if rng.random() < 0.7:
        kw.update(temperature=rng.choice([0.5, 1.0, 1.3]), seed=rng.getrandbits(64))
        if rng.random() < 0.3:
            kw["top_k"] = rng.randint(1, 40)
        if rng.random() < 0.3:
            kw["top_p"] = rng.uniform(0.3, 1.0)
    else:
        kw["temperature"] = 0
    if rng.random() < 0.2:
        kw["stop"] = [rng.choice(["e", "th", "a ", "."])]
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randrange(vocab)]
    request = pb.GenerateRequest(request_id=rid, params=params(**kw))
    if rng.random() < 0.3:
        request.prompt_token_ids.ids.extend(rng.randrange(3, vocab) for _ in range(rng.randint(1, 20)))
    else:
        request.prompt = words
    kind = rng.choices(["sampled", "cancel", "abort"], [0.8, 0.1, 0.1])[0]
    return Spec(kind, request, delay=rng.uniform(0, 0.5))


async def run_one(stub, spec: Spec) -> str:
    """Runs one request; returns how it ended, and checks the stream's own consistency."""
    call = stub.Generate(spec.request, timeout=120)
    if spec.kind == "cancel":
        asyncio.get_running_loop().call_later(spec.delay, call.cancel)
    if spec.kind == "abort":
        async def abort_later():
            await asyncio.sleep(spec.delay)
            try:
                await stub.Abort(pb.AbortRequest(request_id=spec.request.request_id))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND  # it had finished already
        asyncio.ensure_future(abort_later())
    ids: list[int] = []
    last = None
    try:
        async for msg in call:
            assert last is None or not last.finish_reason, "a message after the last one"
            ids += msg.token_ids
            last = msg
    except asyncio.CancelledError:
        assert spec.kind == "cancel"
        return "cancelled"
    except grpc.aio.AioRpcError as exc:
        assert spec.kind == "bad" and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (spec, exc)
        return "refused"
    assert last is not None and last.finish_reason, "the stream ended without a finish reason"
    assert last.completion_tokens == len(ids) <= spec.request.params.max_tokens
    if last.finish_reason == pb.FINISH_REASON_ABORT:
        assert spec.kind == "abort", last.stop_reason
        return "aborted"
    if last.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(ids) == spec.request.params.max_tokens
    if spec.kind == "greedy":
        return "greedy:" + ",".join(map(str, ids))
    return "finished"


async def test_soak_2000_randomized_requests(aio_stub, stub, services):
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    solo = {p: generate(stub, p, max_tokens=REF_TOKENS, temperature=0, ignore_eos=True).token_ids for p in PROMPTS}
    pid = services["scheduler"].proc.pid
    start_rss = rss_kb(pid)["VmRSS"]
    rng = random.Random(20261127)
    specs = [make_spec(i, rng, info.vocab_size) for i in range(N)]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(spec: Spec) -> str:
        async with gate:
            return await run_one(aio_stub, spec)

    t0 = time.monotonic()
    outcomes = await asyncio.gather(*(gated(s) for s in specs))
    duration = time.monotonic() - t0

    assert len(outcomes) == N  # none lost: gather returned one outcome per request, each checked in run_one
    for spec, outcome in zip(specs, outcomes):
        if spec.kind == "greedy":
            p = spec.request.params
            assert outcome == "greedy:" + ",".join(map(str, solo[spec.request.prompt][:p.max_tokens])), spec
    idle = wait_idle(stub)
    leaked = idle.total_kv_blocks - idle.free_kv_blocks
    mem = rss_kb(pid)
    counts = {k: sum(o.startswith(k) for o in outcomes) for k in ("greedy", "finished", "cancelled", "aborted",
                                                                    "refused")}
    print(f"\nsoak: {N} requests in {duration:.1f} s, {counts}; leaked blocks {leaked}; scheduler RSS "
          f"{start_rss / 1024:.0f} MB at start, {mem['VmHWM'] / 1024:.0f} MB peak, {mem['VmRSS'] / 1024:.0f} MB "
          "at the end")
    assert leaked == 0 and idle.running_requests == idle.waiting_requests == 0
    assert counts["cancelled"] + counts["aborted"] >= N // 40 and counts["refused"] >= N // 100
    assert mem["VmRSS"] < start_rss + 64 * 1024  # kB: back near the start, not growing with the request count
