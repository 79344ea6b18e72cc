"""`python -m bench.host`: the scheduler's host time per decode step with N running sequences, no worker.

One step is what the scheduler process does for one worker call of one decode step: plan it (admission, block
allocation, batch building), encode and serialize the ExecuteRequest, parse a response, apply the sampled tokens
(postprocess: stop checks, block registration and hashing, detokenizing) and build and serialize the
GenerateResponse of every stream the step sends to (all of them, or fewer with the scheduler's stream interval,
which by default sends every 4 tokens at 256 running sequences). The worker is replaced by a response of random
token ids, made outside the timed spans, so only host work is timed; the event loop and gRPC's own transport are
not: `--serving` adds them (`measure_serving`: real gRPC streams against a worker process that answers at once),
and on the 2-core machine they cost several times the rest (about 100 us of the scheduler's CPU per streamed
message, most of it inside grpc.aio). Issue #9's bar: at most 1 ms per step with 256 running sequences.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

DECODE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def measure(tokenizer_model: bytes, running: int, steps: int = 300, prompt_len: int = 100, vocab: int = 0,
            extras: bool = False, stream_interval: int = 0) -> dict:
    """p50/p99 host milliseconds per decode step with `running` sequences decoding. extras: every sequence asks
    for penalties and 5 logprobs (the request carries the extra arrays, the response the logprobs).
    stream_interval: the scheduler's (0: its default, by load), which decides how many streams get a message at
    each step."""
    from scheduler_svc.block_manager import BlockManager
    from scheduler_svc.engine import encode_batch
    from scheduler_svc.frontend import response_message
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
                      num_slots=257, stream_interval=stream_interval)
    rng = np.random.default_rng(0)
    for i in range(running):
        prompt = rng.choice(ordinary, prompt_len).tolist()
        sampling = Sampling(max_tokens=10 ** 6, temperature=1.0, seed=i, ignore_eos=True)
        if extras:
            sampling.repetition_penalty, sampling.frequency_penalty, sampling.logprobs = 1.1, 0.2, 5
        sched.add(Sequence(f"r{i}", prompt, sampling, max_length=10 ** 6,
                           detokenizer=IncrementalDetokenizer(tok, prompt), eos_ids=tok.eos_ids))

    def step() -> tuple[bool, float, float, int]:
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = sched.schedule()
        data = encode_batch(batch, width, "bench")
        assert data
        t1, c1 = time.perf_counter(), time.thread_time()
        # the worker (not timed): random ids, and for logprobs the chosen logprob, rank, 20 ids, 20 logprobs
        sampled = rng.choice(ordinary, (batch.rows, batch.num_steps)).astype(np.int32)
        lp = None
        if batch.logprobs:
            lp = -rng.random((batch.rows, batch.num_steps, 42)).astype(np.float32) * 10
            lp[..., 1] = rng.integers(1, 50, lp.shape[:2])
            lp[..., 2:22] = rng.choice(ordinary, (*lp.shape[:2], 20))
        raw = worker_pb2.ExecuteResponse(token_ids=sampled.tobytes(),
                                         logprobs=b"" if lp is None else lp.tobytes()).SerializeToString()
        t2, c2 = time.perf_counter(), time.thread_time()
        response = worker_pb2.ExecuteResponse.FromString(raw)
        sampled = np.frombuffer(response.token_ids, np.int32).reshape(batch.rows, batch.num_steps)
        logprobs = (np.frombuffer(response.logprobs, np.float32).reshape(batch.rows, batch.num_steps, -1)
                    if response.logprobs else None)
        messages = 0
        for seq, delta in sched.postprocess(batch, sampled, logprobs):  # what the streams are sent now
            response_message(seq, delta, tok.texts).SerializeToString()
            messages += 1
        t3, c3 = time.perf_counter(), time.thread_time()
        return batch.is_prefill, t1 - t0 + t3 - t2, c1 - c0 + c3 - c2, messages

    while step()[0]:  # prefill every prompt first
        pass
    for _ in range(8):  # and stream the first tokens
        step()
    times, cpu, messages = (np.array(t) for t in zip(*[step()[1:] for _ in range(steps)]))
    times, cpu = times * 1e3, cpu * 1e3
    return dict(running=running, extras=extras, steps=steps, p50_ms=float(np.percentile(times, 50)),
                p99_ms=float(np.percentile(times, 99)), mean_ms=float(times.mean()),
                cpu_p50_ms=float(np.percentile(cpu, 50)), messages_per_step=float(messages.mean()))


# ---- the serving path: the same host work plus the event loop, the worker's gRPC and streaming to clients ----
def _ordinary_ids(tok) -> np.ndarray:
    sp = tok.sp
    return np.array([i for i in range(tok.size)
                     if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))])


def _fake_worker(tokenizer_model: bytes, ports) -> None:
    """A worker that answers every call at once with random ordinary tokens (a subprocess): the scheduler is then
    the only thing a decode step waits for."""
    from concurrent import futures

    import grpc

    from scheduler_svc.tokenizer import SentencePieceTokenizer
    from tinyvllm.v1 import worker_pb2, worker_pb2_grpc

    tok = SentencePieceTokenizer(tokenizer_model, True, 1, [2])
    ordinary, rng = _ordinary_ids(tok), np.random.default_rng(0)

    class Worker(worker_pb2_grpc.WorkerServicer):
        def GetWorkerInfo(self, request, context):
            return worker_pb2.WorkerInfo(
                model_name="fake", device="none", vocab_size=tok.size, max_context=4096, block_size=16,
                num_kv_blocks=8192, block_table_width=256, decode_batch_sizes=DECODE_BUCKETS,
                prefill_shapes=[worker_pb2.PrefillShape(rows=16, tokens=128)], max_steps_per_call=4,
                tokenizer_model=tokenizer_model, add_bos_token=True, bos_token_id=1, eos_token_ids=[2],
                instance_id="fake", num_sampling_slots=257, num_logprobs=20)

        def Execute(self, request, context):
            tokens = rng.choice(ordinary, (request.rows, request.num_steps)).astype(np.int32)
            return worker_pb2.ExecuteResponse(token_ids=tokens.tobytes())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    worker_pb2_grpc.add_WorkerServicer_to_server(Worker(), server)
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _clients(port: int, running: int, prompt_len: int, tokenizer_model: bytes) -> None:
    """`running` streams that read every message and never finish (a subprocess)."""
    import asyncio

    import grpc

    from scheduler_svc.tokenizer import SentencePieceTokenizer
    from tinyvllm.v1 import scheduler_pb2, scheduler_pb2_grpc

    ordinary = _ordinary_ids(SentencePieceTokenizer(tokenizer_model, True, 1, [2]))

    async def main() -> None:
        rng = np.random.default_rng(1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)

            async def one(i: int) -> None:
                request = scheduler_pb2.GenerateRequest(
                    prompt_token_ids=scheduler_pb2.TokenIds(ids=rng.choice(ordinary, prompt_len).tolist()),
                    params=scheduler_pb2.SamplingParams(max_tokens=3000, temperature=1.0, seed=i, ignore_eos=True))
                async for _ in stub.Generate(request):
                    pass

            await asyncio.gather(*(one(i) for i in range(running)))

    asyncio.run(main())


def measure_serving(tokenizer_model: bytes, running: int, seconds: float = 4.0, stream_steps: int = 2,
                    prompt_len: int = 100) -> dict:
    """The scheduler process's CPU time per decode step while `running` gRPC streams decode against a worker that
    answers at once (both in other processes): bench.host's work plus the event loop, the worker's gRPC, the
    frontend's messages and gRPC's streaming. Calls of `stream_steps` steps, as the engine makes once a batch is
    stable (its default is STREAM_STEPS)."""
    import asyncio
    import multiprocessing

    from scheduler_svc.engine import Engine
    from scheduler_svc.frontend import Frontend, Limits
    from scheduler_svc.server import serve

    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    worker = ctx.Process(target=_fake_worker, args=(tokenizer_model, ports), daemon=True)
    worker.start()

    async def run() -> dict:
        engine = Engine(f"127.0.0.1:{ports.get(timeout=60)}", stream_steps=stream_steps)
        await engine.start(connect_timeout_s=60)
        frontend = Frontend(engine, Limits())
        server, port = await serve(frontend, "127.0.0.1", 0)
        clients = ctx.Process(target=_clients, args=(port, running, prompt_len, tokenizer_model), daemon=True)
        clients.start()
        try:
            while engine.counts() != (running, 0) or engine.stats.tokens < 4 * running:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            t0, c0, k0 = time.perf_counter(), time.process_time(), engine.stats.tokens
            await asyncio.sleep(seconds)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps = (engine.stats.tokens - k0) / running
        finally:
            engine.abort_all("the measurement is over")
            while frontend.streams:
                await asyncio.sleep(0.05)
            clients.kill()
            await server.stop(1)
            await engine.stop()
            await asyncio.sleep(0.2)  # gRPC's poller delivers the cancelled calls' last events to this loop
        return dict(running=running, stream_steps=stream_steps, steps=steps, cpu_ms_per_step=cpu / steps * 1e3,
                    wall_ms_per_step=wall / steps * 1e3)

    try:
        return asyncio.run(run())
    finally:
        worker.kill()


def measure_all(tokenizer_model: bytes, counts=(64, 256), steps: int = 300) -> list[dict]:
    return [measure(tokenizer_model, n, steps, extras=e) for n in counts for e in (False, True)]


def print_rows(rows: list[dict]) -> None:
    print("\nscheduler host time per decode step (no worker):")
    print(f"{'running':>8} {'extras':>7} {'p50 ms':>8} {'p99 ms':>8} {'cpu p50':>8}")
    for r in rows:
        print(f"{r['running']:>8} {'yes' if r['extras'] else 'no':>7} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
              f" {r.get('cpu_p50_ms', float('nan')):>8.3f}")  # reports saved before it had no CPU column


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", help="a tokenizer.model; default: the demo checkpoint's (built if missing)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--serving", action="store_true",
                    help="also time the serving path: gRPC streams against a worker that answers at once")
    args = ap.parse_args()
    path = pathlib.Path(args.tokenizer) if args.tokenizer else None
    if path is None:
        from shared.demo_checkpoint import build_checkpoint

        ckpt = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "bench-demo"
        if not (ckpt / "config.json").exists():
            build_checkpoint(ckpt, shape="demo", dtype="float32")
        path = ckpt / "tokenizer.model"
    print_rows(measure_all(path.read_bytes(), steps=args.steps))
    if args.serving:
        print("\nserving path (scheduler process CPU per decode step; gRPC clients and worker in other processes):")
        print(f"{'running':>8} {'steps/call':>10} {'cpu ms':>8} {'wall ms':>8}")
        for n in (64, 256):
            for k in (1, 2):
                r = measure_serving(path.read_bytes(), n, stream_steps=k)
                print(f"{n:>8} {k:>10} {r['cpu_ms_per_step']:>8.3f} {r['wall_ms_per_step']:>8.3f}")


if __name__ == "__main__":
    main()
