"""Builds everything a worker serves from: config, resident weights, KV pool, model and runner."""
from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import time
from dataclasses import dataclass, field

from tinygrad import Device

from shared.llama_config import LlamaConfig
from worker_svc import capture_cache, tuning
from worker_svc.buckets import DEFAULT_DECODE_BATCH_SIZES, DEFAULT_PREFILL_SHAPES
from worker_svc.kv_cache import PagedKVCache
from worker_svc.model import LlamaModel
from worker_svc.runner import ModelRunner
from worker_svc.tokenizer_files import read_tokenizer_info
from worker_svc.weights import compute_dtype_for, load_weights

log = logging.getLogger(__name__)



@dataclass
class WorkerOptions:
    model: str
    block_size: int = 16
    max_context: int | None = None
    kv_blocks: int | None = None  # default: what kv_cache_gb holds, capped at a full table for every decode row
    kv_cache_gb: float = 4.0
    decode_batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_DECODE_BATCH_SIZES))
    prefill_shapes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_PREFILL_SHAPES))
    max_steps: int = 8
    dtype: str = "auto"
    warm_up: bool = True
    tuning: str | None = None  # tuning table (worker_svc.tuning): None = the one shipped for the device, "none" = off
    capture_cache: bool = True  # keep schedules and lowered kernels on disk (worker_svc.capture_cache)


class WorkerEngine:
    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self.path = pathlib.Path(opts.model).resolve()
        self.config = LlamaConfig.load(self.path)
        self.tokenizer = read_tokenizer_info(self.path, self.config)
        self.device = Device.DEFAULT
        self.tuning = tuning.load_for(self.device, opts.tuning)
        if self.tuning is not None:
            tuning.install(self.tuning)
        self.dtype = compute_dtype_for(self.config, opts.dtype)
        self.max_context = min(opts.max_context or self.config.max_position_embeddings,
                               self.config.max_position_embeddings)
        t0 = time.perf_counter()
        self.weights = load_weights(self.path, self.config, self.dtype, self.device)
        log.info("loaded %s (%.1f MB, %s) onto %s in %.1fs", self.path.name, self.weights.nbytes() / 1e6,
                 self.dtype.name, self.device, time.perf_counter() - t0)
        width = math.ceil(self.max_context / opts.block_size)
        num_blocks = opts.kv_blocks or self._default_kv_blocks(width)
        self.cache = PagedKVCache(self.config.num_hidden_layers, num_blocks, opts.block_size,
                                  self.config.num_key_value_heads, self.config.head_dim, self.dtype, self.device)
        log.info("KV cache: %d blocks of %d tokens (%.1f MB)", num_blocks, opts.block_size, self.cache.nbytes() / 1e6)
        self.model = LlamaModel(self.config, self.weights, self.cache, self.max_context)
        self.runner = ModelRunner(self.model, opts.decode_batch_sizes, opts.prefill_shapes, opts.max_steps)
        if opts.warm_up:
            t0 = time.perf_counter()
            with capture_cache.active() if opts.capture_cache else contextlib.nullcontext():
                self.runner.warm_up()
            s = capture_cache.stats
            log.info("captured %d graphs in %.1fs (capture cache: %d of %d schedules and %d of %d kernels from disk)",
                     len(self.runner.captured()), time.perf_counter() - t0, s.schedule_hits,
                     s.schedule_hits + s.schedule_misses, s.program_hits, s.program_hits + s.program_misses)

    def _default_kv_blocks(self, width: int) -> int:
        per_block = PagedKVCache.bytes_per_block(self.config.num_hidden_layers, self.opts.block_size,
                                                 self.config.num_key_value_heads, self.config.head_dim, self.dtype)
        budget = int(self.opts.kv_cache_gb * 1e9) // per_block
        return 1 + min(budget, max(self.opts.decode_batch_sizes) * width)
