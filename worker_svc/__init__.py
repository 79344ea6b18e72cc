"""tinyvllm worker: model weights and KV cache resident on one accelerator, replayed decode graphs."""
