#!/usr/bin/env bash
# Makes sure the local PostgreSQL server the tests and `make dev` use is up.
# Tests create (and drop) their own databases on it; nothing else is needed.
set -euo pipefail
host=${PGHOST:-127.0.0.1}
port=${PGPORT:-5432}
if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "ensure-postgres: PostgreSQL is not installed; installing it" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
echo "ensure-postgres: starting PostgreSQL $version" >&2
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 60); do
  if pg_isready -q -h "$host" -p "$port"; then
    exit 0
  fi
  sleep 0.5
done
echo "ensure-postgres: PostgreSQL at $host:$port did not come up" >&2
exit 1
