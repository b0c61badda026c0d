#!/usr/bin/env bash
# Makes sure promtool (and the Prometheus server the live alert test runs)
# are installed: Debian's prometheus package, whose service is disabled again
# because the tests start their own server.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
	exit 0
fi
apt_install prometheus
disable_package_service prometheus
