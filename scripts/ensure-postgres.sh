#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests and `make dev` use answers, and
# that they can log in to it. The server is named by VIGIL_TEST_DATABASE_URL
# (default postgres://vigil:vigil@127.0.0.1:5432/postgres?sslmode=disable).
#
# - Nothing answers on a loopback address: installs PostgreSQL (Debian
#   packages) when missing and starts a cluster on that port, creating one
#   (named vigil-PORT) when the port has none.
# - The URL's role cannot log in: creates it (LOGIN CREATEDB, with the URL's
#   password) as the postgres system user over the local socket, which works
#   on a stock Debian install where TCP logins need a password.
# It never stops or reconfigures a server it did not start.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

url=${VIGIL_TEST_DATABASE_URL:-postgres://vigil:vigil@127.0.0.1:5432/postgres?sslmode=disable}
# postgres://user[:password]@host[:port]/db?...
rest=${url#*://}
auth=${rest%%@*}
hostport=${rest#*@}
hostport=${hostport%%/*}
user=${auth%%:*}
password=""
[ "$auth" != "$user" ] && password=${auth#*:}
host=${hostport%:*}
port=${hostport##*:}
[ "$port" = "$hostport" ] && port=5432
host=${host#[}
host=${host%]}

have_tools() { command -v pg_isready >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_isready >/dev/null 2>&1; }
pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
ready() { "$(pgbin)/pg_isready" -q -h "$host" -p "$port"; }

if ! have_tools; then
	# The package creates and starts a cluster "main" on 5432, which is
	# what the default URL wants; it stays (a development machine's server).
	apt_install postgresql postgresql-client
fi

if ! ready; then
	is_loopback "$host" || die "nothing answers at $host:$port and it is not this machine's to start"
	cluster=$(pg_lsclusters -h 2>/dev/null | awk -v p="$port" '$3 == p { print $1 " " $2; exit }')
	if [ -z "$cluster" ]; then
		version=$(basename "$(dirname "$(pgbin)")")
		say "creating PostgreSQL $version cluster vigil-$port on port $port"
		as_root pg_createcluster "$version" "vigil-$port" --port "$port" >/dev/null
		cluster="$version vigil-$port"
	fi
	say "starting PostgreSQL cluster $cluster (port $port)"
	# shellcheck disable=SC2086
	as_root pg_ctlcluster --skip-systemctl-redirect $cluster start || true
	wait_until 60 ready || die "PostgreSQL at $host:$port did not come up"
fi

if PGPASSWORD=$password PGCONNECT_TIMEOUT=5 "$(pgbin)/psql" -w -q -h "$host" -p "$port" -U "$user" -d postgres -Atc 'select 1' >/dev/null 2>&1; then
	exit 0
fi
is_loopback "$host" || die "cannot log in as $user at $host:$port; create the role there (LOGIN CREATEDB)"
say "creating role $user (LOGIN CREATEDB) on port $port"
# Quoting: the role and password come from our own URL; double quotes in
# identifiers and single quotes in literals are doubled.
ident=${user//\"/\"\"}
literal=${password//\'/\'\'}
sql="do \$\$ begin
  if exists (select from pg_roles where rolname = '${user//\'/\'\'}') then
    alter role \"$ident\" login createdb password '$literal';
  else
    create role \"$ident\" login createdb password '$literal';
  end if;
end \$\$;"
as_postgres "$(pgbin)/psql" -q -p "$port" -d postgres -c "$sql" >/dev/null
PGPASSWORD=$password "$(pgbin)/psql" -w -q -h "$host" -p "$port" -U "$user" -d postgres -Atc 'select 1' >/dev/null ||
	die "role $user still cannot log in at $host:$port: check pg_hba.conf"
