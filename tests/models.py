"""Builds the worker's model in-process, for tests that drive it without the gRPC service."""
from __future__ import annotations

import pathlib

from tinygrad import Device

from shared.llama_config import LlamaConfig
from worker_svc.kv_cache import PagedKVCache
from worker_svc.model import LlamaModel
from worker_svc.weights import compute_dtype_for, load_weights


def build_model(checkpoint: pathlib.Path, num_blocks: int, max_context: int = 128, block_size: int = 16) -> LlamaModel:
    cfg = LlamaConfig.load(checkpoint)
    dtype = compute_dtype_for(cfg)
    cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype,
                         Device.DEFAULT)
    return LlamaModel(cfg, load_weights(checkpoint, cfg, dtype), cache, max_context)
