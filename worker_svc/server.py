"""The worker's gRPC face: decodes ExecuteRequests into arrays, runs them, and reports what it serves."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures

import grpc
import numpy as np

from shared.service import SERVER_OPTIONS, add_health_and_reflection
from tinyvllm.v1 import worker_pb2, worker_pb2_grpc
from worker_svc.engine import WorkerEngine
from worker_svc.runner import Batch, BatchError

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
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: WorkerEngine):
        self.engine = engine
        self.instance_id = uuid.uuid4().hex
        self._lock = threading.Lock()  # one batch on the device at a time

    def GetWorkerInfo(self, request, context) -> worker_pb2.WorkerInfo:
        e, r = self.engine, self.engine.runner
        return worker_pb2.WorkerInfo(
            model_path=str(e.path), model_name=e.path.name, device=e.device, dtype=e.dtype.name,
            vocab_size=e.config.vocab_size, max_context=e.max_context, block_size=r.block_size,
            num_kv_blocks=e.cache.num_blocks, block_table_width=r.table_width,
            decode_batch_sizes=r.decode_batch_sizes,
            prefill_shapes=[worker_pb2.PrefillShape(rows=b, tokens=t) for b, t in r.prefill_shapes],
            max_steps_per_call=r.max_steps, tokenizer_model=e.tokenizer.model_bytes,
            add_bos_token=e.tokenizer.add_bos, bos_token_id=e.tokenizer.bos_id,
            eos_token_ids=e.tokenizer.eos_ids, instance_id=self.instance_id)

    def Execute(self, request, context) -> worker_pb2.ExecuteResponse:
        if request.instance_id != self.instance_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this worker is instance {self.instance_id}, not {request.instance_id or '(none)'}: "
                          "its KV cache holds none of the caller's blocks; call GetWorkerInfo and recompute")
        try:
            self.engine.runner.check_bucket(request.rows, request.tokens)
            batch = decode_request(request, self.engine.runner.table_width)
            with self._lock:
                t0 = time.perf_counter()
                tokens = self.engine.runner.execute(batch)
                elapsed = time.perf_counter() - t0
        except BatchError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a failure on the device: say so plainly, keep serving
            log.exception("Execute failed")
            context.abort(grpc.StatusCode.INTERNAL, f"worker failed to run the batch: {type(exc).__name__}: {exc}")
        return worker_pb2.ExecuteResponse(token_ids=np.ascontiguousarray(tokens, np.int32).tobytes(),
                                          device_seconds=elapsed)


def serve(engine: WorkerEngine, host: str, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine), server)
    add_health_and_reflection(server, [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name], aio=False)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    server.start()
    log.info("worker serving on %s:%d (device %s)", host, bound, engine.device)
    return server
