"""The worker's gRPC face: decodes ExecuteRequests into arrays, runs them in the order the scheduler sent them,
and reports what it serves."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent import futures

import grpc
import numpy as np

from shared.auth import RequireSecret
from shared.service import SERVER_OPTIONS, add_health_and_reflection
from tinyvllm.v1 import worker_pb2, worker_pb2_grpc
from worker_svc.engine import WorkerEngine
from worker_svc.runner import LOGPROB_COLS, Batch, BatchError, SlotInit
from worker_svc.sampling import NUM_LOGPROBS

log = logging.getLogger(__name__)


def _array(data: bytes, dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A writable copy: tinygrad's CUDA copy-in takes the address of the host buffer, which a read-only
    np.frombuffer view of the request's bytes refuses ("underlying buffer is not writable")."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise BatchError(f"{name}: expected {expected} bytes for shape {shape}, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def decode_request(req: worker_pb2.ExecuteRequest, width: int) -> Batch:
    B, T = req.rows, req.tokens
    return Batch(
        token_ids=_array(req.token_ids, np.int32, (B, T), "token_ids"),
        positions=_array(req.positions, np.int32, (B,), "positions"),
        chunk_lens=_array(req.chunk_lens, np.int32, (B,), "chunk_lens"),
        block_tables=_array(req.block_tables, np.int32, (B, width), "block_tables"),
        temperature=_array(req.temperature, np.float32, (B,), "temperature"),
        top_p=_array(req.top_p, np.float32, (B,), "top_p"),
        top_k=_array(req.top_k, np.int32, (B,), "top_k"),
        seeds=_array(req.seeds, np.uint32, (B,), "seeds"),
        counters=_array(req.counters, np.uint32, (B,), "counters"),
        num_steps=req.num_steps or 1,
        prev_rows=_prev_rows(req, B),
        slots=_optional(req.slots, np.int32, B, "slots"),
        min_p=_optional(req.min_p, np.float32, B, "min_p"),
        repetition_penalty=_optional(req.repetition_penalty, np.float32, B, "repetition_penalty"),
        presence_penalty=_optional(req.presence_penalty, np.float32, B, "presence_penalty"),
        frequency_penalty=_optional(req.frequency_penalty, np.float32, B, "frequency_penalty"),
        logprobs=req.logprobs,
        slot_inits=[_slot_init(init) for init in req.slot_inits],
        seeds_high=_optional(req.seeds_high, np.uint32, B, "seeds_high"),
        prompt_logprobs=req.prompt_logprobs,
    )


def _optional(data: bytes, dtype, B: int, name: str) -> np.ndarray | None:
    return _array(data, dtype, (B,), name) if data else None


def _ids(data: bytes, dtype, name: str) -> np.ndarray:
    if len(data) % 4:
        raise BatchError(f"slot_inits: {name} must be a whole number of 4-byte values")
    return np.frombuffer(data, dtype=dtype).copy()


def _slot_init(init: worker_pb2.SlotInit) -> SlotInit:
    return SlotInit(slot=init.slot, prompt_ids=_ids(init.prompt_ids, np.int32, "prompt_ids"),
                    output_ids=_ids(init.output_ids, np.int32, "output_ids"),
                    bias_ids=_ids(init.bias_ids, np.int32, "bias_ids"),
                    bias_values=_ids(init.bias_values, np.float32, "bias_values"),
                    allowed_ids=_ids(init.allowed_ids, np.int32, "allowed_ids"), min_tokens=init.min_tokens,
                    stop_ids=_ids(init.stop_ids, np.int32, "stop_ids"))


def _prev_rows(req: worker_pb2.ExecuteRequest, B: int) -> np.ndarray | None:
    if not req.previous_rows:
        return None
    rows = _array(req.previous_rows, np.int32, (B,), "previous_rows")
    if (rows >= 0).any() and not req.previous_call:
        raise BatchError("previous_rows name rows of a previous call, but previous_call is 0")
    return rows


class OutOfOrder(Exception):
    """A call that must follow a call the worker did not run last (or that failed): its inputs are not there."""


class CallOrder:
    """Runs numbered calls strictly in the order the scheduler sent them, one at a time.

    gRPC hands concurrent calls to a thread pool in no particular order, and a pipelined call N+1 reads what call
    N left on the device (its sampled tokens, its KV writes), so N+1 waits here until N has been launched (the
    device runs launched work in order; N's results are awaited after, outside this lock). Only the calls that
    touched the device count as run; a refused call (bad shape, wrong instance) leaves the last one as it was.
    """

    ARRIVAL_WAIT_S = 10.0  # how long to wait for a previous call that has not even arrived
    KEEP = 256  # outcomes remembered, for calls that arrive after their predecessor settled

    def __init__(self):
        self._cond = threading.Condition()
        self._last_run = 0  # call_index of the last call that ran on the device (0: unnumbered or none)
        self._last_ok = False
        self._arrived: set[int] = set()  # numbered calls received and not yet settled
        self._settled: OrderedDict[int, bool] = OrderedDict()  # call_index -> ran successfully

    def arrive(self, index: int) -> None:
        if index:
            with self._cond:
                self._arrived.add(index)
                self._settled.pop(index, None)  # a number used before (another scheduler session) is a new call

    def run(self, index: int, previous: int, fn):
        """Waits for `previous` to settle, checks it ran last and succeeded, then runs fn() with the device to
        itself. Raises OutOfOrder (nothing runs) if not. fn raises BatchError only before touching the device (a
        refusal); any other exception counts as a failed run."""
        with self._cond:
            if previous:
                deadline = time.monotonic() + self.ARRIVAL_WAIT_S
                while previous not in self._settled:
                    left = deadline - time.monotonic()
                    if previous not in self._arrived and left <= 0:
                        self._settle(index, ran=False, ok=False)
                        raise OutOfOrder(f"call {index} follows call {previous}, which never reached this worker")
                    self._cond.wait(timeout=max(left, 0.0) if previous not in self._arrived else None)
                if self._last_run != previous or not self._last_ok:
                    last = self._last_run or "an unnumbered call or none"
                    how = "failed" if self._last_run == previous else f"was not the last call run (that was {last})"
                    self._settle(index, ran=False, ok=False)
                    raise OutOfOrder(f"call {index} follows call {previous}, which {how}: the sampled tokens and KV "
                                     "writes it builds on are not there; resend it with token ids and no "
                                     "previous call")
            try:
                result = fn()
            except BatchError:  # refused by validation, before anything touched the device
                self._settle(index, ran=False, ok=False)
                raise
            except BaseException:
                self._settle(index, ran=True, ok=False)
                raise
            self._settle(index, ran=True, ok=True)
            return result

    def refuse(self, index: int) -> None:
        """A numbered call refused before running: calls that follow it are refused at once, not after a wait."""
        if index:
            with self._cond:
                self._settle(index, ran=False, ok=False)

    def _settle(self, index: int, ran: bool, ok: bool) -> None:
        if ran:
            self._last_run, self._last_ok = index, ok
        if index:
            self._arrived.discard(index)
            self._settled[index] = ok
            while len(self._settled) > self.KEEP:
                self._settled.popitem(last=False)
        self._cond.notify_all()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: WorkerEngine):
        self.engine = engine
        self.instance_id = uuid.uuid4().hex
        self.order = CallOrder()  # also keeps one launch on the device at a time
        self._last_done = 0.0  # when the last call's results were back (perf_counter)

    def GetWorkerInfo(self, request, context) -> worker_pb2.WorkerInfo:
        e, r = self.engine, self.engine.runner
        return worker_pb2.WorkerInfo(
            model_path=str(e.path), model_name=e.path.name, device=e.device, dtype=e.dtype.name,
            vocab_size=e.config.vocab_size, max_context=e.max_context, block_size=r.block_size,
            num_kv_blocks=e.cache.num_blocks, block_table_width=r.table_width,
            decode_batch_sizes=r.decode_batch_sizes,
            prefill_shapes=[worker_pb2.PrefillShape(rows=b, tokens=t) for b, t in r.prefill_shapes],
            max_steps_per_call=r.max_steps, tokenizer_model=e.tokenizer.model_bytes,
            tokenizer_json=e.tokenizer.json_bytes, add_bos_token=e.tokenizer.add_bos, bos_token_id=e.tokenizer.bos_id,
            eos_token_ids=e.tokenizer.eos_ids, instance_id=self.instance_id, chat_template=e.tokenizer.chat_template,
            bos_token=e.tokenizer.bos_token, eos_token=e.tokenizer.eos_token, num_sampling_slots=r.num_slots,
            num_logprobs=NUM_LOGPROBS)

    def Execute(self, request, context) -> worker_pb2.ExecuteResponse:
        index = request.call_index
        if request.instance_id != self.instance_id:
            self.order.refuse(index)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this worker is instance {self.instance_id}, not {request.instance_id or '(none)'}: "
                          "its KV cache holds none of the caller's blocks; call GetWorkerInfo and recompute")
        self.order.arrive(index)
        runner = self.engine.runner
        try:
            try:
                runner.check_bucket(request.rows, request.tokens)
                batch = decode_request(request, runner.table_width)
            except Exception:  # never ran: a call that follows it is refused at once
                self.order.refuse(index)
                raise

            t0 = time.perf_counter()
            # the device is this call's only while it launches; its results are awaited after, so the next call
            # is launched while this one still runs and the GPU does not idle between calls
            result = self.order.run(index, request.previous_call, lambda: runner.launch(batch))
            tokens, logprobs, prompt_logprobs = result()
            done = time.perf_counter()  # device time: from this launch, or the previous call's end if later
            elapsed, self._last_done = done - max(t0, self._last_done), done
        except OutOfOrder as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        except BatchError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a failure on the device: say so plainly, keep serving
            log.exception("Execute failed")
            context.abort(grpc.StatusCode.INTERNAL, f"worker failed to run the batch: {type(exc).__name__}: {exc}")
        assert logprobs is None or logprobs.shape[-1] == LOGPROB_COLS
        return worker_pb2.ExecuteResponse(
            token_ids=np.ascontiguousarray(tokens, np.int32).tobytes(), device_seconds=elapsed,
            logprobs=b"" if logprobs is None else np.ascontiguousarray(logprobs, np.float32).tobytes(),
            prompt_logprobs=(b"" if prompt_logprobs is None
                             else np.ascontiguousarray(prompt_logprobs, np.float32).tobytes()))


def serve(engine: WorkerEngine, host: str, port: int, secret: str) -> grpc.Server:
    """Serves only callers that present `secret` (shared/auth.py); health and reflection stay open."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS,
                         interceptors=[RequireSecret(secret)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine), server)
    add_health_and_reflection(server, [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name], aio=False)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    server.start()
    log.info("worker serving on %s:%d (device %s)", host, bound, engine.device)
    return server
