"""Reads a call's results back to the host without making the next call wait for the read.

The worker launches call N, then call N+1 as soon as it arrives, while N still runs. N's sampled tokens must
reach the host as soon as N finishes, but a plain copy-out synchronises the whole device: it would wait for N+1 as
well, and while it waited nothing else could be launched, so the GPU would idle between calls. On CUDA the copy
is queued on the device's stream right behind N, into pinned host memory, with an event after it; the thread that
answers call N waits for that event alone, outside the device lock, while other threads launch. Elsewhere (CPU,
Metal) the copy is made at once, synchronously, as before: correct everywhere, overlapped where the backend lets
us wait for part of its queue.
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import numpy as np
from tinygrad import Device, Tensor
from tinygrad.device import Buffer, BufferSpec
from tinygrad.dtype import _to_np_dtype

Wait = Callable[[], np.ndarray]  # blocks until the copy has landed, returns the host array


def _buffer(t: Tensor) -> Buffer:
    """The realized device buffer behind a realized, contiguous tensor."""
    buf = t.uop.base.buffer
    assert isinstance(buf, Buffer) and buf.is_allocated(), "read back needs a realized tensor"
    return buf


class SyncReadBack:
    """Copies a prefix of a device buffer to the host now (the device is synchronised first)."""

    def start(self, t: Tensor, count: int) -> Wait:
        buf = _buffer(t)
        if hasattr(buf.allocator, "_as_buffer"):  # host-visible memory (CPU, Metal): synchronise, then read it
            view = buf.as_memoryview(allow_zero_copy=True)
            out = np.frombuffer(view, dtype=_to_np_dtype(buf.dtype), count=count).copy()
        else:
            out = buf.view(count, buf.dtype, 0).ensure_allocated().numpy()
        return lambda: out


class CUDAReadBack:
    """Queues the copy behind the work launched so far and records an event; waiting syncs on that event only."""

    def __init__(self, device: str):
        from tinygrad.runtime.autogen import cuda
        from tinygrad.runtime.ops_cuda import check

        self.cuda, self.check = cuda, check
        self.dev = Device[device]
        self._lock = threading.Lock()
        self._free: dict[int, list[ctypes.c_void_p]] = {}  # pinned host buffers by size, ready for reuse
        self._landed: list[tuple] = []  # tinygrad's upload staging entries that an awaited event showed done

    def _release_uploads(self) -> None:
        """tinygrad frees the pinned staging buffers of host-to-device copies only when the device is synchronised,
        which the overlapped read-back never does: give back those that an awaited event has shown to be done.
        Called with the device to ourselves (under the worker's launch lock), like every other tinygrad call."""
        with self._lock:
            landed, self._landed = self._landed, []
        if landed:  # `landed` keeps the entries alive, so their ids stay unique here
            done = {id(entry) for entry in landed}
            pending = self.dev.pending_copyin
            for entry in pending:
                if id(entry) in done:
                    self.dev.allocator.free(*entry)
            pending[:] = [entry for entry in pending if id(entry) not in done]

    def _pinned(self, nbytes: int) -> ctypes.c_void_p:
        with self._lock:
            pool = self._free.setdefault(nbytes, [])
            if pool:
                return pool.pop()
        return self.dev.allocator.alloc(nbytes, BufferSpec(host=True))

    def start(self, t: Tensor, count: int) -> Wait:
        cuda, check = self.cuda, self.check
        self._release_uploads()
        buf = _buffer(t)
        nbytes = count * buf.dtype.itemsize
        host = self._pinned(nbytes)
        check(cuda.cuCtxSetCurrent(self.dev.context))
        src = cuda.CUdeviceptr_v2(buf._buf.value + buf.offset)  # same stream as the graphs: ordered after them
        check(cuda.cuMemcpyDtoHAsync_v2(host, src, nbytes, None))
        event = cuda.CUevent()
        check(cuda.cuEventCreate(ctypes.byref(event), 0x2))  # CU_EVENT_DISABLE_TIMING
        check(cuda.cuEventRecord(event, None))
        covered = list(self.dev.pending_copyin)  # uploads queued before the event: done when it is
        dtype = _to_np_dtype(buf.dtype)

        def wait() -> np.ndarray:
            try:
                check(cuda.cuCtxSetCurrent(self.dev.context))
                check(cuda.cuEventSynchronize(event))
                out = np.empty(count, dtype=dtype)
                ctypes.memmove(out.ctypes.data, host, nbytes)
                with self._lock:
                    self._landed.extend(covered)
                return out
            finally:
                cuda.cuEventDestroy_v2(event)
                with self._lock:
                    self._free[nbytes].append(host)
        return wait


def for_device(device: str) -> SyncReadBack | CUDAReadBack:
    """The overlapped read-back where the backend allows it (CUDA), the synchronous one elsewhere."""
    return CUDAReadBack(device) if device.split(":")[0] == "CUDA" else SyncReadBack()
