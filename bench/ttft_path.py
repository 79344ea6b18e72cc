"""`python -m bench.ttft_path`: where an idle request's time to first token goes, stage by stage.

Starts a worker and a scheduler (as `python -m bench` does, each in its own process) with timestamps hooked into
both, sends `--requests` one-token requests of a `--prompt`-token prompt one at a time to the idle server, and
prints the median time between consecutive stages of each request's path:

    client send -> scheduler's Generate runs -> request submitted -> worker call encoded and sent
    -> worker's interceptor -> request deserialized -> Execute runs -> request decoded -> launch -> results back
    -> Execute returns -> response serialized -> scheduler has the answer -> loop applies it -> first message
    yielded to gRPC -> client receives it

All stamps are time.perf_counter_ns(), CLOCK_MONOTONIC on Linux, so the processes' stamps compare directly. Then
it times bare round trips between the same two processes, from the scheduler's event loop over its own worker
channel: a health check, and an Execute the worker refuses at once (wrong instance id), to tell gRPC's transport
cost from the code around it. The hooks wrap functions from outside (nothing in the services changes for it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import runpy
import sys
import threading
import time

ROLE_ENV, DIR_ENV, PROFILE_ENV = "TTFT_PROBE_ROLE", "TTFT_PROBE_DIR", "TTFT_PROBE_PROFILE"
RTT_ID = "__ttft_probe_rtt__"

_stamps: list[tuple[str, int]] = []


def stamp(name: str) -> None:
    _stamps.append((name, time.perf_counter_ns()))


def _flusher(path: pathlib.Path) -> None:
    """Appends the process's stamps to its file every 0.1 s (off every request's path)."""
    with path.open("a") as f:
        while True:
            time.sleep(0.1)
            n = len(_stamps)
            if n:
                f.write("".join(f"{name} {t}\n" for name, t in _stamps[:n]))
                f.flush()
                del _stamps[:n]


def _start_flusher(role: str) -> None:
    path = pathlib.Path(os.environ[DIR_ENV]) / f"{role}.stamps"
    threading.Thread(target=_flusher, args=(path,), daemon=True).start()


def _wrap(obj, name: str, before: str | None = None, after: str | None = None) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if before:
            stamp(before)
        try:
            return fn(*args, **kwargs)
        finally:
            if after:
                stamp(after)

    setattr(obj, name, wrapper)


# ---- the worker's hooks ----------------------------------------------------------------------------------------
def _hook_worker() -> None:
    from shared import auth
    from worker_svc import runner, server

    intercept = auth.RequireSecret.intercept_service

    def intercept_service(self, continuation, details):
        if not details.method.endswith("/Execute"):
            return intercept(self, continuation, details)
        stamp("w_intercept")
        handler = intercept(self, continuation, details)
        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        def request_deserializer(data):
            stamp("w_deserialize")
            return deserialize(data)

        def response_serializer(message):
            stamp("w_return")
            try:
                return serialize(message)
            finally:
                stamp("w_serialized")

        return handler._replace(request_deserializer=request_deserializer, response_serializer=response_serializer)

    auth.RequireSecret.intercept_service = intercept_service
    _wrap(server.WorkerServicer, "Execute", before="w_execute")
    _wrap(server, "decode_request", after="w_decoded")
    launch = runner.ModelRunner.launch

    def launch_stamped(self, batch):
        stamp("w_launch")
        result = launch(self, batch)
        stamp("w_launched")

        def result_stamped():
            try:
                return result()
            finally:
                stamp("w_results")

        return result_stamped

    runner.ModelRunner.launch = launch_stamped


# ---- the scheduler's hooks -------------------------------------------------------------------------------------
async def _round_trips(engine, n: int) -> None:
    """Bare round trips over the scheduler's own worker channel, on its own loop: stamps rtt_* (start, end)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tinyvllm.v1 import worker_pb2

    health = health_pb2_grpc.HealthStub(engine.channel)
    refused = worker_pb2.ExecuteRequest(instance_id="not-this-worker").SerializeToString()
    for _ in range(n):
        stamp("rtt_health_start")
        await health.Check(health_pb2.HealthCheckRequest())
        stamp("rtt_health_end")
    for _ in range(n):
        stamp("rtt_refused_start")
        try:
            await engine._execute(refused, timeout=10, metadata=engine.metadata)
        except Exception:
            pass
        stamp("rtt_refused_end")


def _hook_scheduler() -> None:
    from scheduler_svc import engine as engine_mod
    from scheduler_svc import server
    from tinyvllm.v1 import worker_pb2

    generate = server.SchedulerServicer.Generate

    async def generate_stamped(self, request, context):
        stamp("s_generate")
        first = True
        async for response in generate(self, request, context):
            if first and response.token_ids:
                stamp("s_yield")
            yield response
            if first and response.token_ids:
                stamp("s_written")
                first = False

    server.SchedulerServicer.Generate = generate_stamped
    abort = server.SchedulerServicer.Abort

    async def abort_or_probe(self, request, context):
        if request.request_id.startswith(RTT_ID):
            await _round_trips(self.frontend.engine, int(request.request_id[len(RTT_ID):] or 200))
            from tinyvllm.v1 import scheduler_pb2

            return scheduler_pb2.AbortResponse()
        return await abort(self, request, context)

    server.SchedulerServicer.Abort = abort_or_probe
    from scheduler_svc import frontend

    _wrap(frontend.Frontend, "_prompt_ids", before="s_tokenize", after="s_tokenized")
    _wrap(engine_mod.Engine, "new_sequences", after="s_sequences")
    _wrap(engine_mod.Engine, "submit", after="s_submitted")
    _wrap(engine_mod.Engine, "_send_ready", before="s_send_ready")
    _wrap(frontend, "response_message", before="s_message")
    _wrap(engine_mod.Engine, "_encode", before="s_encode")
    _wrap(engine_mod.Engine, "_pop_call", before="s_pop")
    init = engine_mod.Engine.__init__

    def init_stamped(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def response_deserializer(data):
            stamp("s_answer")
            return worker_pb2.ExecuteResponse.FromString(data)

        stamped = self.channel.unary_unary("/tinyvllm.v1.Worker/Execute", request_serializer=None,
                                           response_deserializer=response_deserializer)

        def execute_stamped(request, **kw):
            call = stamped(request, **kw)
            stamp("s_sent")
            return call

        self._execute = execute_stamped

    engine_mod.Engine.__init__ = init_stamped
    postprocess = engine_mod.Scheduler.postprocess

    def postprocess_stamped(self, *args, **kwargs):
        stamp("s_postprocess")
        try:
            return postprocess(self, *args, **kwargs)
        finally:
            stamp("s_postprocessed")

    engine_mod.Scheduler.postprocess = postprocess_stamped


def _run_role(role: str) -> None:
    _start_flusher(role)
    if role == "worker":
        _hook_worker()
        module = "worker_svc"
    else:
        _hook_scheduler()
        module = "scheduler_svc"
    sys.argv = [module, *sys.argv[1:]]
    if not os.environ.get(PROFILE_ENV):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(pathlib.Path(os.environ[DIR_ENV]) / f"{role}.prof")


# ---- the driver ------------------------------------------------------------------------------------------------
# (label, stamp, process): the path of one request, in order; each row of the table is the time from the row
# above it
PATH = [
    ("client sends Generate", "c_send", "client"),
    ("scheduler's Generate handler runs", "s_generate", "scheduler"),
    ("validated; tokenizing (a thread if large)", "s_tokenize", "scheduler"),
    ("tokenized", "s_tokenized", "scheduler"),
    ("on the loop, sequences made", "s_sequences", "scheduler"),
    ("submitted", "s_submitted", "scheduler"),
    ("engine loop wakes (_send_ready)", "s_send_ready", "scheduler"),
    ("planned; encode_batch starts", "s_encode", "scheduler"),
    ("encoded; Execute call started", "s_sent", "scheduler"),
    ("worker's interceptor runs", "w_intercept", "worker"),
    ("request deserialized (starts)", "w_deserialize", "worker"),
    ("Execute handler runs", "w_execute", "worker"),
    ("decode_request done", "w_decoded", "worker"),
    ("launch starts", "w_launch", "worker"),
    ("launch returned", "w_launched", "worker"),
    ("results read back", "w_results", "worker"),
    ("Execute returned, serializing", "w_return", "worker"),
    ("response serialized", "w_serialized", "worker"),
    ("scheduler deserializes the answer", "s_answer", "scheduler"),
    ("loop pops the call", "s_pop", "scheduler"),
    ("postprocess starts", "s_postprocess", "scheduler"),
    ("postprocess done", "s_postprocessed", "scheduler"),
    ("stream wakes, builds the message", "s_message", "scheduler"),
    ("first message yielded to gRPC", "s_yield", "scheduler"),
    ("client receives it", "c_first", "client"),
]


def _read_stamps(path: pathlib.Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, t = line.split()
            out.setdefault(name, []).append(int(t))
    return out


def _first_in(times: list[int], lo: int, hi: int) -> int | None:
    return next((t for t in times if lo <= t <= hi), None)


async def _client(address: str, prompt_ids: list[int], requests: int, gap_s: float, rtt: int,
                  max_tokens: int = 1) -> list[dict]:
    import grpc

    from tinyvllm.v1 import scheduler_pb2 as pb
    from tinyvllm.v1 import scheduler_pb2_grpc

    out = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        async def one(ids, max_tokens=1):
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids),
                                     params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            t = {"c_send": time.perf_counter_ns()}
            async for msg in stub.Generate(req):
                if msg.token_ids and "c_first" not in t:
                    t["c_first"] = time.perf_counter_ns()
            t["c_end"] = time.perf_counter_ns()
            return t

        for _ in range(3 if requests else 0):  # warm the path (imports, connections)
            await one(prompt_ids, 4)
        for _ in range(requests):
            await asyncio.sleep(gap_s)
            out.append(await one(prompt_ids, max_tokens))
        await asyncio.sleep(0.3)
        if rtt:
            await stub.Abort(pb.AbortRequest(request_id=f"{RTT_ID}{rtt}"))
    return out


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def report(client: list[dict], worker: dict[str, list[int]], scheduler: dict[str, list[int]]) -> dict:
    by_process = {"worker": worker, "scheduler": scheduler}
    rows: dict[str, list[float]] = {label: [] for label, _, _ in PATH[1:]}
    totals = {"ttft": [], "call": [], "worker_own": [], "launch_to_results": []}
    for t in client:
        lo, hi = t["c_send"], t["c_end"]
        times = {}
        for _, name, proc in PATH:  # each stage: its first stamp after the stage before it
            times[name] = t.get(name) if proc == "client" else _first_in(by_process[proc].get(name, []), lo, hi)
            lo = times[name] if times[name] is not None else lo
        for (label, name, _), (_, prev, _) in zip(PATH[1:], PATH):
            if times[name] is not None and times[prev] is not None:
                rows[label].append((times[name] - times[prev]) / 1e6)
        if None not in times.values():
            totals["ttft"].append((times["c_first"] - times["c_send"]) / 1e6)
            totals["call"].append((times["s_pop"] - times["s_sent"]) / 1e6)
            totals["worker_own"].append((times["w_return"] - times["w_decoded"]) / 1e6)
            totals["launch_to_results"].append((times["w_results"] - times["w_launch"]) / 1e6)
    return {"stages_ms": {k: _median(v) for k, v in rows.items()},
            "totals_ms": {k: _median(v) for k, v in totals.items()}}


def rtt_report(scheduler: dict[str, list[int]]) -> dict:
    out = {}
    for kind in ("health", "refused"):
        starts, ends = scheduler.get(f"rtt_{kind}_start", []), scheduler.get(f"rtt_{kind}_end", [])
        out[kind] = _median([(e - s) / 1e6 for s, e in zip(starts, ends)][10:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=["demo", "tinyllama"], default="demo")
    ap.add_argument("--model", help="an existing checkpoint instead of the bench's generated one")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=1, help="tokens each request asks for (the TTFT of a "
                    "longer request includes what the scheduler does beside its first token)")
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between requests (the server idles)")
    ap.add_argument("--rtt", type=int, default=200, help="bare round trips of each kind (0: none)")
    ap.add_argument("--worker-args", default="", help="extra worker flags")
    ap.add_argument("--scheduler-args", default="", help="extra scheduler flags")
    ap.add_argument("--out", default=None, help="directory for logs and stamps (default: a temporary one)")
    args = ap.parse_args()
    import json
    import tempfile

    import numpy as np

    from bench.__main__ import checkpoint_for
    from shared.processes import Service

    args.model = args.model or None
    ckpt = checkpoint_for(args)
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="ttft-path-"))
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.stamps"):
        f.unlink()
    os.environ[DIR_ENV] = str(out)
    os.environ[ROLE_ENV] = "worker"
    worker = Service.start("worker", __spec__.name, ["--model", str(ckpt), "--max-steps", "16", "--kv-cache-gb", "8",
                                                     *args.worker_args.split()], out)
    try:
        os.environ[ROLE_ENV] = "scheduler"
        scheduler = Service.start("scheduler", __spec__.name, ["--worker", worker.address, "--http-port", "0",
                                                               *args.scheduler_args.split()], out)
        del os.environ[ROLE_ENV]
        try:
            rng = np.random.default_rng(0)
            prompt = [1, *rng.integers(3, 250, size=args.prompt - 1).tolist()]
            services = (("worker", worker), ("scheduler", scheduler))
            cpu = {name: _cpu_seconds(svc.proc.pid) for name, svc in services}
            time.sleep(2.0)
            idle = {name: (_cpu_seconds(svc.proc.pid) - cpu[name]) / 2.0 * 1e3 for name, svc in services}
            cpu = {name: _cpu_seconds(svc.proc.pid) for name, svc in services}
            client = asyncio.run(_client(scheduler.address, prompt, args.requests, args.gap, 0, args.max_tokens))
            cpu = {name: (_cpu_seconds(svc.proc.pid) - cpu[name]) / (args.requests + 3) * 1e3
                   for name, svc in services}
            if args.rtt:
                asyncio.run(_client(scheduler.address, prompt, 0, 0, args.rtt))
            time.sleep(0.5)  # the flushers
        finally:
            scheduler.stop()
    finally:
        worker.stop()
    result = report(client, _read_stamps(out / "worker.stamps"), _read_stamps(out / "scheduler.stamps"))
    result["rtt_ms"] = rtt_report(_read_stamps(out / "scheduler.stamps"))
    result["cpu_ms_per_request"] = cpu
    print(f"\nidle TTFT path, {args.requests} requests of {args.prompt} -> {args.max_tokens} tokens, medians in ms "
          f"(each row: since the row above):")
    for label, ms in result["stages_ms"].items():
        print(f"  {label:<42} {ms:8.3f}")
    t = result["totals_ms"]
    print(f"TTFT {t['ttft']:.3f}; worker call (sent -> popped) {t['call']:.3f}; worker own (decoded -> returned) "
          f"{t['worker_own']:.3f}; launch -> results {t['launch_to_results']:.3f}")
    print(f"bare round trips over the scheduler's worker channel: health check {result['rtt_ms']['health']:.3f}, "
          f"Execute refused at once {result['rtt_ms']['refused']:.3f}")
    print("CPU time per request (user + system, all threads): " +
          ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu.items()) + "; idle, per second: " +
          ", ".join(f"{name} {ms:.1f} ms" for name, ms in idle.items()))
    (out / "ttft_path.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'ttft_path.json'}")


if __name__ == "__main__":
    if os.environ.get(ROLE_ENV):
        _run_role(os.environ[ROLE_ENV])
    else:
        main()
