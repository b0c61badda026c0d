# Shared by the set-up scripts: messages, privileges and Debian packages.
# Sourced, not run.

say() { echo "$(basename "$0"): $*" >&2; }
die() { say "$*"; exit 1; }

# as_root runs a command as root: directly when we are root, else through sudo.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		die "need root for: $* (run as root or install sudo)"
	fi
}

# as_postgres runs a command as the postgres system user, who may connect
# over the local socket on a stock Debian install (peer authentication).
as_postgres() {
	if [ "$(id -un)" = postgres ]; then
		"$@"
	elif [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		sudo -u postgres "$@"
	fi
}

apt_updated=""
# apt_install installs Debian packages, running `apt-get update` once.
apt_install() {
	command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install $* yourself"
	if [ -z "$apt_updated" ]; then
		as_root apt-get update -qq
		apt_updated=1
	fi
	say "installing $*"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# disable_package_service stops and disables a service a package enabled on
# install: this is a development machine, the project starts what it needs.
disable_package_service() {
	if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet "$1" 2>/dev/null; then
		as_root systemctl disable --now "$1" >/dev/null 2>&1 || true
	elif [ -x "/etc/init.d/$1" ]; then
		as_root "/etc/init.d/$1" stop >/dev/null 2>&1 || true
	fi
}

# is_loopback: only servers on this machine's loopback are started here;
# anything else is someone else's to run.
is_loopback() {
	case "$1" in
	127.* | localhost | ::1 | '[::1]') return 0 ;;
	*) return 1 ;;
	esac
}

# wait_until retries a command for up to $1 half-seconds.
wait_until() {
	local tries=$1
	shift
	for _ in $(seq 1 "$tries"); do
		if "$@" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.5
	done
	return 1
}
