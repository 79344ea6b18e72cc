"""The worker without gRPC: device bandwidth, decode step time and kernels per bucket, prefill throughput."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tinygrad import Context, Device, Tensor, dtypes

from worker_svc.engine import WorkerEngine
from worker_svc.runner import Batch, ModelRunner


def sync() -> None:
    Device[Device.DEFAULT].synchronize()


def measure_bandwidth(gigabytes: float, beam: int = 0) -> float:
    """Device memory bandwidth in GB/s: the best of fp16 reductions (bytes read) and an elementwise pass (bytes
    read + written) over a buffer much larger than any cache, each timed after a warm-up run. tinygrad's default
    kernels reach a fraction of a GPU's bandwidth (about 860 of 4,200 GB/s on an H200), so on GPUs the probe's
    kernels are searched with BEAM first."""
    with Context(BEAM=beam):
        return _best_bandwidth(int(gigabytes * 1e9) // 2)


def torch_cuda_bandwidth(gigabytes: float) -> float | None:
    """The same probe with PyTorch's CUDA kernels (a second opinion where torch is installed): read-only sums and
    a copy (read + write) over a buffer much larger than L2. None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.ones(int(gigabytes * 1e9) // 2, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    best = _best_rate([(lambda: x.sum(dtype=torch.float32), x.nbytes), (lambda: y.copy_(x), 2 * x.nbytes)],
                      torch.cuda.synchronize)
    del x, y
    torch.cuda.empty_cache()
    return best


def _best_bandwidth(n: int) -> float:
    x = Tensor.ones(n // 4096, 4096, dtype=dtypes.float16).contiguous().realize()
    best = _best_rate([(lambda: x.sum(1, dtype=dtypes.float32).realize(), n * 2),
                       (lambda: x.float().sum().realize(), n * 2),
                       (lambda: (x + 1).realize(), n * 4)], sync)
    del x
    return best


def _best_rate(passes: list[tuple[Callable[[], object], int]], synchronize: Callable[[], object]) -> float:
    """GB/s of the fastest of five timed runs of each (run, bytes moved) pass, each after an untimed run."""
    best = 0.0
    for run, nbytes in passes:
        run()
        synchronize()
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            synchronize()
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def blocks_per_row(runner: ModelRunner, context: int, steps: int) -> int:
    """Blocks holding positions 0 .. context + steps - 2: the chunk ends at context - 1 and each further step
    writes one more position."""
    return -(-(context + steps - 1) // runner.block_size)


def real_batch(runner: ModelRunner, rows: int, tokens: int, context: int, steps: int = 1) -> Batch:
    """Every row a real sequence whose chunk of `tokens` ends at `context`, each with its own blocks."""
    b = runner.dummy_batch(rows, tokens, num_steps=steps)
    per_row = blocks_per_row(runner, context, steps)
    ids = np.arange(1, 1 + rows * per_row, dtype=np.int32) % (runner.model.cache.num_blocks - 1) + 1
    b.block_tables[:, :per_row] = ids.reshape(rows, per_row)
    b.chunk_lens[:], b.positions[:] = tokens, context - tokens
    b.token_ids[:] = 7
    return b


def with_penalties_and_logprobs(batch: Batch) -> Batch:
    """The batch with every row asking for repetition and frequency penalties and logprobs: the full-sampling
    graph, each row on its own sampling slot."""
    rows = batch.token_ids.shape[0]
    batch.slots = np.arange(1, rows + 1, dtype=np.int32)
    batch.repetition_penalty = np.full(rows, 1.1, np.float32)
    batch.frequency_penalty = np.full(rows, 0.2, np.float32)
    batch.logprobs = True
    return batch


def median_seconds(runner: ModelRunner, batch: Batch, repeats: int) -> float:
    """Median wall time of a call after one untimed call; execute() returns only once the device is done."""
    runner.execute(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(engine: WorkerEngine, context: int = 256, repeats: int = 5) -> dict:
    runner = engine.runner
    out: dict = {"decode": [], "prefill": []}
    steps = runner.max_steps
    for rows in runner.decode_batch_sizes:
        if rows * blocks_per_row(runner, context, steps) >= runner.model.cache.num_blocks:
            continue  # not enough KV blocks for this many rows at this context
        step = median_seconds(runner, real_batch(runner, rows, 1, context, steps), repeats) / steps
        full = median_seconds(runner, with_penalties_and_logprobs(real_batch(runner, rows, 1, context, steps)),
                              repeats) / steps
        out["decode"].append(dict(rows=rows, context=context, step_ms=step * 1e3, tok_s=rows / step,
                                  step_ms_penalties_logprobs=full * 1e3,
                                  kernels_per_step=runner.kernels_per_step(rows, 1, filters=False),
                                  kernels_per_step_top_k_p=runner.kernels_per_step(rows, 1, filters=True)))
    for rows, tokens in runner.prefill_shapes:
        if tokens == 1 or rows * blocks_per_row(runner, tokens, 1) >= runner.model.cache.num_blocks:
            continue
        t = median_seconds(runner, real_batch(runner, rows, tokens, tokens), repeats)
        out["prefill"].append(dict(rows=rows, tokens=tokens, ms=t * 1e3, tok_s=rows * tokens / t,
                                   kernels=runner.kernels_per_step(rows, tokens, filters=False)))
        if rows == 1:  # a request with prompt logprobs runs its chunks alone: its graph, captured on first use
            out["prefill"][-1].update(prompt_logprobs(runner, tokens, repeats))
    return out


def prompt_logprobs(runner: ModelRunner, tokens: int, repeats: int) -> dict:
    """The 1-row prefill bucket's prompt-logprobs graph: its capture (what the first such request waits for) and
    its call time against the full-sampling graph's (the plain graph's is `ms`)."""
    batch = real_batch(runner, 1, tokens, tokens)
    batch.logprobs = True  # the full-sampling graph, which the prompt-logprobs graph extends
    full = median_seconds(runner, batch, repeats)
    batch.prompt_logprobs = True
    t0 = time.perf_counter()
    runner.execute(batch)
    capture = time.perf_counter() - t0
    t = median_seconds(runner, batch, repeats)
    return dict(ms_full_sampling=full * 1e3, ms_prompt_logprobs=t * 1e3, prompt_logprobs_capture_s=capture,
                kernels_prompt_logprobs=runner.kernels_per_step(1, tokens, True, prompt_logprobs=True))
