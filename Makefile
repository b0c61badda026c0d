GO       ?= go
TOOLS    := $(GO) tool -modfile=tools/go.mod
PKGS     := ./...
BIN      := bin

# The build's identity, shown by `vigil version` and vigil_build_info.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -X github.com/vigil-sh/vigil/internal/buildinfo.version=$(VERSION) \
            -X github.com/vigil-sh/vigil/internal/buildinfo.revision=$(REVISION)
# setup.sh installs and starts what the tests need beyond Go (see the README).
SETUP    := ./scripts/setup.sh

.PHONY: all build image dev test test-short test-long check fmt vet tidy generate generate-check bench clean chaos

all: build

## build: vigil (without `vigil dev`) and agentsim in bin/, stamped with VERSION and REVISION.
build:
	$(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $(BIN)/ ./cmd/...

## image: the container image (needs a Docker engine), stamped like `make build`.
image:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t vigil:$(VERSION) .

## dev: a whole local cluster (embedded etcd, agentsim, three replicas); Ctrl-C stops it.
## DEV_FLAGS passes flags to `vigil dev` (--hosts 2000, --agent-tls, ...). It uses the machine's default
## addresses, not the tests' VIGIL_TEST_* ones.
dev:
	env -u VIGIL_TEST_DATABASE_URL -u VIGIL_TEST_REDIS_ADDR $(SETUP) --no-promtool
	$(GO) run -tags dev ./cmd/vigil dev $(DEV_FLAGS)

## test: the whole suite; installs and starts PostgreSQL, Redis and promtool when missing (scripts/setup.sh).
test:
	$(SETUP)
	$(GO) test -count=1 -timeout 20m $(PKGS)
	./deploy/check.sh

test-short:
	$(SETUP)
	$(GO) test -short -count=1 $(PKGS)

## test-long: fault runs too long for the suite (repeated kills, latency distributions).
test-long:
	$(SETUP) --no-promtool
	VIGIL_LONG=1 $(GO) test -count=1 -timeout 60m -run 'Long|Distribution' -v ./...

## bench: the whole benchmark in one run (< 15 min): agentsim, Postgres, embedded etcd and vigil replicas as
## real processes; prints every figure with its target and writes bench/results/<UTC timestamp>.json and
## latest.json (commit them with the change they measure). BENCH_FLAGS passes flags: -hosts 2000, -profile, ...
bench: build
	$(SETUP) --no-promtool
	$(GO) run ./bench -bin $(BIN) $(BENCH_FLAGS)

## bench-smoke: the same on a small fleet (< 1 min): checks that every figure is produced and sane, not the
## targets; results go to $TMPDIR/vigil-bench-smoke. Also run by `make test` (bench.TestSmoke).
.PHONY: bench-smoke
bench-smoke: build
	$(SETUP) --no-promtool
	$(GO) run ./bench -smoke -bin $(BIN) $(BENCH_FLAGS)

## bench-fleet: the fleet-scale run (about 20 min, not in `make test`): 100,000 hosts × 20 sandboxes over mutual
## TLS, 10 replicas at the default 30 s interval, each shard's lag and the whole fleet's cost watched for 5 min,
## then a replica killed; writes bench/results/fleet/<UTC timestamp>.json. BENCH_FLAGS: -hosts 50000, -duration 10m, ...
.PHONY: bench-fleet
bench-fleet: build
	$(SETUP) --no-promtool
	$(GO) run ./bench -fleet -bin $(BIN) -out bench/results/fleet $(BENCH_FLAGS)

## chaos: the nemesis harness (chaos/, see chaos/README.md): three etcd processes, agentsim with 1,000 hosts and
## churn, 3-5 replicas behind fault proxies, a seeded mix of faults and bad input, a quiet period, then the checker
## over the journal, etcd's record and the agents' records; then the same against a build with the fence check
## disabled, which must be caught. Prints the figures; exits non-zero on any violation. DURATION=10m, SEED=, and
## CHAOS_FLAGS= for more (-kinds kill,pause, -dir DIR, -lease-ttl 5s, ...; go run ./chaos/cmd/chaos -h).
DURATION ?= 10m
chaos:
	$(SETUP) --no-promtool
	$(GO) run ./chaos/cmd/chaos -duration $(DURATION) $(if $(SEED),-seed $(SEED)) $(CHAOS_FLAGS)

## soak: the long run (chaos/soak.go, not in `make test`): 3 replicas over 2,000 hosts with churn, events and a
## fault every 3 minutes on the run's own Postgres pair; samples RSS, heap, goroutines, fds, Postgres connections,
## outbox and journal rows, etcd keys and revision every 30 s, and fails if any keeps growing past the warm-up (a
## fitted slope). DURATION= (default 2h). Table, samples and plot in chaos/results/soak/<UTC time>/.
.PHONY: soak
soak:
	$(SETUP) --no-promtool
	$(GO) run ./chaos/cmd/chaos -soak -duration $(if $(filter command line environment,$(origin DURATION)),$(DURATION),2h) $(if $(SEED),-seed $(SEED)) $(CHAOS_FLAGS)

## check: formatting, vet, module tidiness and generated-code drift.
check: fmt vet tidy generate-check

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^tools/')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)
	$(GO) vet -tags dev ./cmd/vigil

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
