# ThrottleX developer entry points. `make demo` and `make test` work on a fresh Debian machine:
# they create .venv, install ThrottleX, and start Kafka and Redis with deploy/local/services.sh.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

export THROTTLEX_KAFKA_BOOTSTRAP ?= 127.0.0.1:$(or $(THROTTLEX_KAFKA_PORT),9092)
export THROTTLEX_REDIS_URL       ?= redis://127.0.0.1:$(or $(THROTTLEX_REDIS_PORT),6379)/0
# Local trials and tests may start with the development salt; a deployment must set its own secrets.
export THROTTLEX_ALLOW_DEV_SECRETS ?= 1

# The Envoy rate-limit service (ingest/rls) is Go: the toolchain on PATH, or where Go's tarball installs it.
GO  ?= $(or $(shell command -v go 2>/dev/null),/usr/local/go/bin/go)
RLS := ingest/rls
RLS_SOURCES := $(shell find $(RLS) -name '*.go' -o -name go.mod -o -name go.sum)

.PHONY: help install services cluster tools demo test test-go test-image image rls-image-binary typecheck bench bench-sink down clean

help:
	@echo "make demo      run the whole pipeline locally with traffic; shows blocked keys and a quota report"
	@echo "make test      type-check and run the whole test suite (Python and Go) against local Kafka, Redis and chDB"
	@echo "make image     build the container image throttlex:local (deploy/Dockerfile; docs/deploying.md)"
	@echo "make test-image  build the image and run each role from it, and the compose file of local images"
	@echo "make bench     every benchmark beside the alternatives (writes BENCHMARKS.md, tests/perf/results.json)"
	@echo "make bench-sink  measure the sink's rows per second into chDB (writes tests/perf/results.json)"
	@echo "make services  start local Kafka and Redis (deploy/local/services.sh up)"
	@echo "make cluster   start a local cluster: three Kafka brokers, Redis with Sentinel (deploy/local/cluster.sh up)"
	@echo "make down      stop them"
	@echo "make clean     remove .venv and local data (.throttlex/)"

$(BIN)/throttlex: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,test,bench]'
	@touch $@

# throttlex-rls beside the Python command line, so both are on the same PATH once .venv/bin is; rls-client
# (Envoy's RLS client, for the tests, the benchmark and a smoke test of a deployment) beside it.
$(BIN)/throttlex-rls: $(BIN)/throttlex $(RLS_SOURCES)
	@test -x "$(GO)" || { echo "throttlex-rls (the Envoy rate-limit service) needs Go 1.26 or later: install it from https://go.dev/dl/ into /usr/local/go, or set GO=/path/to/go" >&2; exit 1; }
	cd $(RLS) && $(GO) build -trimpath -buildvcs=false -o $(abspath $(BIN))/ ./cmd/throttlex-rls ./cmd/rls-client

install: $(BIN)/throttlex $(BIN)/throttlex-rls

# The Go side's own checks: formatting, vet, and its tests (the conformance vectors in tests/conformance included).
test-go: install
	@unformatted="$$(cd $(RLS) && $(dir $(GO))gofmt -l .)"; test -z "$$unformatted" || { echo "not gofmt-formatted: $$unformatted" >&2; exit 1; }
	cd $(RLS) && $(GO) vet ./... && $(GO) test -race ./...

services:
	deploy/local/services.sh up

cluster:
	deploy/local/cluster.sh up

demo: install
	PATH="$(abspath $(BIN)):$$PATH" deploy/local/demo.sh

typecheck: install
	mkdir -p .typecheck/throttlex
	for package in ingest processors api; do ln -sfn ../../$$package .typecheck/throttlex/$$package; done
	$(BIN)/mypy

tools:
	deploy/local/tools.sh

test: install services tools typecheck test-go
	$(BIN)/pytest -m "not image"
	@echo "Kafka and Redis are still running for the next run; 'make down' stops them."

# A static throttlex-rls for the container image (copied in by deploy/Dockerfile).
rls-image-binary:
	@test -x "$(GO)" || { echo "the image's throttlex-rls is built on the host and needs Go 1.26 or later (https://go.dev/dl/)" >&2; exit 1; }
	cd $(RLS) && CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags="-s -w" -o $(abspath build/image)/throttlex-rls ./cmd/throttlex-rls

image: rls-image-binary
	deploy/local/image.sh build

test-image: install services tools image
	deploy/local/image.sh services
	$(BIN)/pytest -m image

bench: install services
	command -v wrk >/dev/null || (apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk))
	$(BIN)/python -m tests.perf.bench $(BENCH_ARGS)

bench-sink: install services
	$(BIN)/python -m tests.perf.bench_sink

down:
	deploy/local/services.sh down
	deploy/local/cluster.sh down

clean: down
	rm -rf $(VENV) .throttlex
