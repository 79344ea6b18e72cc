"""`make bench`: tinyvllm's speed through its public gRPC API, its worker alone, and peers on the same shapes."""
