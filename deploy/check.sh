#!/usr/bin/env bash
# Validates everything in deploy/: promtool's checks and rule unit tests, then
# the Go validation tests (compose, Kubernetes, Grafana, PromQL against vigil's
# real metrics and flags). Installs promtool (Debian package "prometheus") when
# it is missing. Run from anywhere: deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null 2>&1; then
	echo "promtool not found: installing the Debian package prometheus" >&2
	SUDO=""
	if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
	# The package enables a prometheus service; this is a build machine.
	if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
		$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
	fi
fi
promtool --version 2>&1 | head -n1

(
	cd prometheus
	promtool check config prometheus.yml
	promtool check rules vigil-rules.yml
	promtool test rules vigil-rules.test.yml
)

gofmt_out=$(gofmt -l .)
if [ -n "$gofmt_out" ]; then
	echo "gofmt needed:" >&2
	echo "$gofmt_out" >&2
	exit 1
fi
go vet ./...
go test -count=1 ./...
