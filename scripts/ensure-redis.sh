#!/usr/bin/env bash
# Makes sure a Redis answers where the tests look for it: VIGIL_TEST_REDIS_ADDR
# (default 127.0.0.1:6379). When nothing answers on that loopback address it
# installs redis-server (Debian package) if missing and starts one of its own
# there, in memory only (no RDB, no AOF), daemonized, with its files under
# ${TMPDIR:-/tmp}/vigil-redis-PORT. It never touches a Redis it did not start.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

addr=${VIGIL_TEST_REDIS_ADDR:-127.0.0.1:6379}
host=${addr%:*}
port=${addr##*:}

# ping speaks RESP over bash's /dev/tcp: no client needed.
ping() {
	local reply
	exec 3<>"/dev/tcp/$host/$port" || return 1
	printf 'PING\r\n' >&3
	read -r -t 2 reply <&3 || true
	exec 3<&- 3>&-
	[ "${reply%$'\r'}" = "+PONG" ]
}

if ping 2>/dev/null; then
	exit 0
fi
is_loopback "$host" || die "nothing answers at $addr and it is not this machine's to start"
if ! command -v redis-server >/dev/null 2>&1; then
	apt_install redis-server
	disable_package_service redis-server
fi
dir=${TMPDIR:-/tmp}/vigil-redis-$port
mkdir -p "$dir"
say "starting redis-server on $addr (in memory; files in $dir)"
redis-server --bind "$host" --port "$port" --save '' --appendonly no \
	--daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
wait_until 20 ping || die "redis-server on $addr did not answer; see $dir/redis.log"
