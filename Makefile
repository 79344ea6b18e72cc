# Entry points. `make test` is what CI runs; `make run-worker` + `make run-scheduler` serve a model.
PYTHON      ?= python3
MODEL       ?=
WORKER_PORT ?= 50061
WORKER      ?= 127.0.0.1:$(WORKER_PORT)
PORT        ?= 50051
HTTP_PORT   ?= 8000
HOST        ?= 127.0.0.1
DEMO_DIR    ?= .cache/demo-model
BENCH_ARGS  ?=
export DEV  ?= CPU

PROTOS := $(wildcard protos/tinyvllm/v1/*.proto)
GEN    := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

.PHONY: setup clang protos demo-model run-worker run-scheduler run-demo client test bench profile tune clean

setup: clang  ## install clang (DEV=CPU), the pinned dependencies (pyproject.toml) and generate the protobuf code
	$(PYTHON) -m pip install -q -e '.[test]'
	$(MAKE) protos

clang:  ## tinygrad's CPU backend compiles kernels with clang: install it with apt-get where it is missing
	@command -v clang >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); echo "installing clang (DEV=CPU compiles kernels with it)"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq clang >/dev/null; \
	  else \
	    echo "DEV=CPU needs clang and this machine has none: install it (macOS: xcode-select --install)," \
	         "or run on a GPU (DEV=CUDA, DEV=METAL)"; exit 1; \
	  fi; }

protos: $(GEN)

tinyvllm/v1/%_pb2.py: protos/tinyvllm/v1/%.proto
	$(PYTHON) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $<

$(DEMO_DIR)/config.json: shared/demo_checkpoint.py  # rebuilt when the builder changes (e.g. its chat template)
	$(PYTHON) -m shared.demo_checkpoint $(DEMO_DIR)

demo-model: $(DEMO_DIR)/config.json

run-worker: protos $(if $(MODEL),,demo-model)
	$(PYTHON) -m worker_svc --model $(or $(MODEL),$(DEMO_DIR)) --host $(HOST) --port $(WORKER_PORT) $(WORKER_ARGS)

run-scheduler: protos
	$(PYTHON) -m scheduler_svc --worker $(WORKER) --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) $(SCHEDULER_ARGS)

run-demo: protos demo-model  ## both services on the demo model, until Ctrl-C
	$(PYTHON) -m scheduler_svc.launch --model $(or $(MODEL),$(DEMO_DIR)) --worker-port $(WORKER_PORT) --port $(PORT) --http-port $(HTTP_PORT)

client: protos
	$(PYTHON) -m scheduler_svc.client --server $(HOST):$(PORT) $(CLIENT_ARGS) "$(or $(PROMPT),Once upon a time)"

test: protos
	$(PYTHON) -m pytest -q tests

bench: protos
	$(PYTHON) -m bench $(BENCH_ARGS)

profile:  ## where a decode step's time goes, kernel by kernel (PROFILE_ARGS="--shape tinyllama --beam 4")
	$(PYTHON) -m bench.profile $(PROFILE_ARGS)

clean:
	rm -rf tinyvllm/v1/*_pb2*.py tinyvllm/v1/*_pb2*.pyi .cache .pytest_cache

tune:  ## BEAM-search the large kernels once and write tuning/<DEV>.json, which the worker applies at start (TUNE_ARGS="--shape tinyllama")
	$(PYTHON) -m bench.tune $(TUNE_ARGS)
