# Entry points. `make test` is what CI runs; `make run-worker` + `make run-scheduler` serve a model.
PYTHON      ?= python3
MODEL       ?=
WORKER_PORT ?= 50061
WORKER      ?= 127.0.0.1:$(WORKER_PORT)
PORT        ?= 50051
HOST        ?= 127.0.0.1
DEMO_DIR    ?= .cache/demo-model
BENCH_ARGS  ?=
export DEV  ?= CPU

PROTOS := $(wildcard protos/tinyvllm/v1/*.proto)
GEN    := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

.PHONY: setup protos demo-model run-worker run-scheduler run-demo client test bench profile tune clean

setup:  ## install the pinned dependencies (pyproject.toml) and generate the protobuf code
	$(PYTHON) -m pip install -q -e '.[test]'
	$(MAKE) protos

protos: $(GEN)

tinyvllm/v1/%_pb2.py: protos/tinyvllm/v1/%.proto
	$(PYTHON) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $<

$(DEMO_DIR)/config.json:
	$(PYTHON) -m shared.demo_checkpoint $(DEMO_DIR)

demo-model: $(DEMO_DIR)/config.json

run-worker: protos $(if $(MODEL),,demo-model)
	$(PYTHON) -m worker_svc --model $(or $(MODEL),$(DEMO_DIR)) --host $(HOST) --port $(WORKER_PORT) $(WORKER_ARGS)

run-scheduler: protos
	$(PYTHON) -m scheduler_svc --worker $(WORKER) --host $(HOST) --port $(PORT) $(SCHEDULER_ARGS)

run-demo: protos demo-model  ## both services on the demo model, until Ctrl-C
	$(PYTHON) -m scheduler_svc.launch --model $(or $(MODEL),$(DEMO_DIR)) --worker-port $(WORKER_PORT) --port $(PORT)

client: protos
	$(PYTHON) -m scheduler_svc.client --server $(HOST):$(PORT) "$(or $(PROMPT),Once upon a time)"

test: protos
	$(PYTHON) -m pytest -q tests

bench: protos
	$(PYTHON) -m bench $(BENCH_ARGS)

profile:  ## where a decode step's time goes, kernel by kernel (PROFILE_ARGS="--shape tinyllama --beam 4")
	$(PYTHON) -m bench.profile $(PROFILE_ARGS)

clean:
	rm -rf tinyvllm .cache .pytest_cache

tune:  ## BEAM-search the large kernels once and write tuning/<DEV>.json, which the worker applies at start (TUNE_ARGS="--shape tinyllama")
	$(PYTHON) -m bench.tune $(TUNE_ARGS)
