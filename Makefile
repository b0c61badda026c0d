GO       ?= go
TOOLS    := $(GO) tool -modfile=tools/go.mod
PKGS     := ./...
BIN      := bin

.PHONY: all build dev test test-short test-long check fmt vet tidy generate generate-check bench clean chaos

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

## dev: a whole local cluster (embedded etcd, agentsim, three replicas); Ctrl-C stops it.
dev:
	./scripts/ensure-postgres.sh
	$(GO) run ./cmd/vigil dev

## test: the whole suite; starts the local Postgres if it is down.
test:
	./scripts/ensure-postgres.sh
	$(GO) test -count=1 -timeout 20m $(PKGS)
	./deploy/check.sh

test-short:
	./scripts/ensure-postgres.sh
	$(GO) test -short -count=1 $(PKGS)

## test-long: fault runs too long for the suite (repeated kills, latency distributions).
test-long:
	./scripts/ensure-postgres.sh
	VIGIL_LONG=1 $(GO) test -count=1 -timeout 60m -run 'Long|Distribution' -v ./...

## bench: the whole benchmark in one run (< 15 min): agentsim, Postgres, embedded etcd and vigil replicas as
## real processes; prints every figure with its target and writes bench/results/<UTC timestamp>.json and
## latest.json (commit them with the change they measure). BENCH_FLAGS passes flags: -hosts 2000, -profile, ...
bench: build
	./scripts/ensure-postgres.sh
	$(GO) run ./bench -bin $(BIN) $(BENCH_FLAGS)

## bench-smoke: the same on a small fleet (< 1 min): checks that every figure is produced and sane, not the
## targets; results go to $TMPDIR/vigil-bench-smoke. Also run by `make test` (bench.TestSmoke).
.PHONY: bench-smoke
bench-smoke: build
	./scripts/ensure-postgres.sh
	$(GO) run ./bench -smoke -bin $(BIN) $(BENCH_FLAGS)

## chaos: the nemesis harness (chaos/, see chaos/README.md): three etcd processes, agentsim with 1,000 hosts and
## churn, 3-5 replicas behind fault proxies, a seeded mix of faults and bad input, a quiet period, then the checker
## over the journal, etcd's record and the agents' records; then the same against a build with the fence check
## disabled, which must be caught. Prints the figures; exits non-zero on any violation. DURATION=10m, SEED=, and
## CHAOS_FLAGS= for more (-kinds kill,pause, -dir DIR, -lease-ttl 5s, ...; go run ./chaos/cmd/chaos -h).
DURATION ?= 10m
chaos:
	./scripts/ensure-postgres.sh
	$(GO) run ./chaos/cmd/chaos -duration $(DURATION) $(if $(SEED),-seed $(SEED)) $(CHAOS_FLAGS)

## check: formatting, vet, module tidiness and generated-code drift.
check: fmt vet tidy generate-check

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^tools/')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)

tidy:
	$(GO) mod tidy -diff
	cd tools && $(GO) mod tidy -diff

generate:
	$(TOOLS) buf generate

generate-check: generate
	@git diff --exit-code -- proto || (echo "generated code is out of date: run make generate and commit"; exit 1)
	@test -z "$$(git status --porcelain -- proto)" || (git status --porcelain -- proto; echo "untracked generated files"; exit 1)

clean:
	rm -rf $(BIN)
