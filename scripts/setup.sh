#!/usr/bin/env bash
# Everything `make test` and `make dev` need on this machine beyond Go:
# PostgreSQL with a login for the tests, Redis, and (unless --no-promtool)
# promtool and Prometheus. Each step says what it did and does nothing when
# the thing is already there. Addresses: VIGIL_TEST_DATABASE_URL and
# VIGIL_TEST_REDIS_ADDR (see the README).
set -euo pipefail
dir=$(dirname "$0")
"$dir/ensure-postgres.sh"
"$dir/ensure-redis.sh"
if [ "${1:-}" != "--no-promtool" ]; then
	"$dir/ensure-promtool.sh"
fi
