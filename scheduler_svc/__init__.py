"""tinyvllm scheduler: the public gRPC service that owns every sequence, its KV blocks and the batches."""
