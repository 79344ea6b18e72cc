"""Generated protobuf and gRPC code of tinyvllm's contracts (`make protos` writes it from protos/)."""
