PY := .venv/bin/python
PROTO_OUT := node-agent/node_agent/protocol/proto_gen

.PHONY: setup test lint unit kernel lab bench proto front clean

setup:
	bash scripts/setup.sh

proto: $(PROTO_OUT)/node_proxy_pb2.py $(PROTO_OUT)/zds_pb2.py

$(PROTO_OUT)/node_proxy_pb2.py: proto/headrace/v1/node_proxy.proto
	mkdir -p $(PROTO_OUT)
	PATH=$(CURDIR)/.venv/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto/headrace/v1 --python_out=$(PROTO_OUT) \
	  --grpc_python_out=$(PROTO_OUT) --mypy_out=$(PROTO_OUT) proto/headrace/v1/node_proxy.proto
	sed -i 's/^import node_proxy_pb2/from . import node_proxy_pb2/' $(PROTO_OUT)/node_proxy_pb2_grpc.py
	touch $(PROTO_OUT)/__init__.py

$(PROTO_OUT)/zds_pb2.py: proto/istio/zds/zds.proto
	mkdir -p $(PROTO_OUT)
	PATH=$(CURDIR)/.venv/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto/istio/zds --python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) proto/istio/zds/zds.proto
	touch $(PROTO_OUT)/__init__.py

# headrace-cni's compiled front (the relayed commands without an interpreter): static, libc only.
FRONT := cni/front/headrace-cni-front
CFLAGS_FRONT := -O2 -static -s -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong

front: $(FRONT)

$(FRONT): cni/front/front.c
	$(CC) $(CFLAGS_FRONT) -o $@.tmp $< && mv $@.tmp $@

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

# The one test command (README and .ci/run): set-up, lint, type check, every test.
test: setup
	$(MAKE) -s lint
	$(PY) -m pytest tests --durations=15

unit: setup
	$(PY) -m pytest tests/unit

kernel: setup
	$(PY) -m pytest tests -m kernel

lab: setup
	.venv/bin/headrace lab run

bench: setup
	$(PY) bench/cni_add_latency.py --runs 30
	$(PY) bench/agent_enrol.py
	$(PY) bench/redirect_overhead.py --rounds 5 --requests 2000 --connections 500

clean:
	rm -rf .venv $(PROTO_OUT) $(FRONT) .pytest_cache .mypy_cache .ruff_cache
