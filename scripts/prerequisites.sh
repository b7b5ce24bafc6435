# shellcheck shell=bash
# Sourced by scripts/up, scripts/test and scripts/install: installs nats-server and the PostgreSQL
# server from the OS packages (Debian, Ubuntu) when they are missing.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    log "please install: $* (this script knows only apt-get)"
    return 1
  fi
  log "installing $* from the OS packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The folder of the PostgreSQL server binaries (initdb, pg_ctl), or nothing.
postgres_bindir() {
  local dir
  if command -v pg_config >/dev/null && dir=$(pg_config --bindir 2>/dev/null) && [ -x "$dir/initdb" ]; then
    echo "$dir"
    return
  fi
  dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  if [ -x "$dir/initdb" ]; then echo "$dir"; fi
}

ensure_nats_server() {
  if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
    apt_install nats-server
  fi
}

ensure_postgres_server() {
  if [ -z "$(postgres_bindir)" ]; then
    apt_install postgresql
  fi
}
