"""Ending requests early: the Abort RPC, a client that cancels, and a deadline that passes. Each stops its sequence
at once and returns its blocks; the other streams are untouched (greedy outputs equal to solo runs)."""
from __future__ import annotations

import asyncio
import random
import time
import uuid

import grpc
import pytest

from tests.test_integration import PROMPTS, Result, generate, params, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb

KW = dict(max_tokens=6, temperature=0, ignore_eos=True)


def test_abort_rpc_ends_the_stream_at_once_and_frees_its_blocks(stub):
    request_id = f"abort-{uuid.uuid4().hex}"
    stream = stub.Generate(pb.GenerateRequest(request_id=request_id, prompt="Once upon a time",
                                              params=params(max_tokens=200, ignore_eos=True)), timeout=60)
    next(stream)
    t0 = time.monotonic()
    stub.Abort(pb.AbortRequest(request_id=request_id))
    last = list(stream)[-1]
    assert time.monotonic() - t0 < 2
    assert last.finish_reason == pb.FINISH_REASON_ABORT and "Abort" in last.stop_reason
    assert last.completion_tokens < 200
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks


def test_abort_of_an_unknown_request_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Abort(pb.AbortRequest(request_id="no-such-request"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


LONG = dict(max_tokens=200, temperature=0, ignore_eos=True)  # still running when its end comes


async def _one(stub, i: int, how: str, rng: random.Random) -> tuple[str, Result | grpc.StatusCode]:
    """Runs request i. `how` ends a long request early at a random moment: "abort" (the RPC, after its first
    message, when the server surely knows it), "cancel" (the client), "deadline"; "none" runs a short one."""
    request_id = f"mass-{i}-{uuid.uuid4().hex[:8]}"
    prompt = PROMPTS[i % len(PROMPTS)]
    # cancel and deadline moments fall within a stream's life: 200 tokens took 0.9 s for a stream that ran alone
    # at the end (a moment up to 1.5 s let a fast stream finish first, and end with "length")
    timeout = rng.uniform(0.05, 0.75) if how == "deadline" else 120
    call = stub.Generate(pb.GenerateRequest(request_id=request_id, prompt=prompt,
                                            params=params(**(KW if how == "none" else LONG))), timeout=timeout)
    if how == "cancel":
        asyncio.get_running_loop().call_later(rng.uniform(0, 0.75), call.cancel)
    delay = rng.uniform(0, 0.2)  # 200 tokens took 0.9 s for a stream that ran alone at the end
    r = Result()
    try:
        async for msg in call:
            if how == "abort" and not r.messages:
                asyncio.get_running_loop().call_later(
                    delay, lambda: asyncio.ensure_future(stub.Abort(pb.AbortRequest(request_id=request_id))))
            r.messages += 1
            r.token_ids += list(msg.token_ids)
            r.text += msg.text
            if msg.finish_reason:
                r.finish, r.stop_reason = msg.finish_reason, msg.stop_reason
    except asyncio.CancelledError:
        return prompt, grpc.StatusCode.CANCELLED
    except grpc.aio.AioRpcError as exc:
        return prompt, exc.code()
    return prompt, r


async def test_half_of_200_streams_end_early_and_the_rest_are_exact(aio_stub, stub):
    """200 streams, 100 of them aborted, cancelled or past their deadline at random moments (running or still
    waiting): each of those ends cleanly, every other stream gets exactly its solo greedy output, and all blocks
    come back."""
    solo = {p: generate(stub, p, **KW) for p in PROMPTS}
    long_solo = {p: generate(stub, p, **LONG) for p in PROMPTS[:4]}
    rng = random.Random(8)
    hows = ["abort"] * 34 + ["cancel"] * 33 + ["deadline"] * 33 + ["none"] * 100
    rng.shuffle(hows)
    results = await asyncio.gather(*(_one(aio_stub, i, how, rng) for i, how in enumerate(hows)))
    for how, (prompt, r) in zip(hows, results):
        if how == "none":
            assert not isinstance(r, grpc.StatusCode), r
            assert r.finish == pb.FINISH_REASON_LENGTH and r.token_ids == solo[prompt].token_ids, prompt
            assert r.text == solo[prompt].text
        elif how == "abort":
            assert r.finish == pb.FINISH_REASON_ABORT and "Abort" in r.stop_reason
            assert len(r.token_ids) < LONG["max_tokens"]
            if prompt in long_solo:  # what it produced before the abort is exact too
                assert r.token_ids == long_solo[prompt].token_ids[:len(r.token_ids)]
        else:
            assert r == {"cancel": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}[how]
    info = wait_idle(stub)
    assert info.free_kv_blocks == info.total_kv_blocks
    assert info.running_requests == info.waiting_requests == 0
