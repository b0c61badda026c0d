#!/usr/bin/env bash
# Validates everything in deploy/: promtool's checks and rule unit tests, then
# the Go validation tests (compose, Kubernetes, Grafana, PromQL against vigil's
# real metrics and flags). promtool comes from ../scripts/ensure-promtool.sh
# (Debian's prometheus package) when it is missing. Run from anywhere:
# deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")"

../scripts/ensure-promtool.sh
promtool --version 2>&1 | head -n1

(
	cd prometheus
	promtool check config prometheus.yml
	promtool check rules vigil-rules.yml
	promtool test rules vigil-rules.test.yml vigil-rules.clusters.test.yml
)

gofmt_out=$(gofmt -l .)
if [ -n "$gofmt_out" ]; then
	echo "gofmt needed:" >&2
	echo "$gofmt_out" >&2
	exit 1
fi
go vet ./...
go test -count=1 ./...
