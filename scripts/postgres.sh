#!/usr/bin/env bash
# A private PostgreSQL for the tests: Debian's packages (installed with
# apt-get when missing), a cluster made with initdb in a temporary directory,
# listening on a free loopback port, run as an unprivileged user (the server
# refuses to run as root), removed afterwards.
#
#   scripts/postgres.sh run -- CMD ARGS...   start it, run CMD with the variables
#                                            below, stop it and remove it (also
#                                            when CMD fails); exits with CMD's status
#   scripts/postgres.sh install              install the packages if missing
#   scripts/postgres.sh stop|start           for a drill: stop (immediate, like a
#                                            crash) or start the cluster of $APITOKENS_PG_DIR
#
# CMD sees:
#   APITOKENS_TEST_POSTGRES  postgres://apitokens@127.0.0.1:PORT/postgres (trust
#                            authentication on loopback: no password to leak)
#   APITOKENS_PG_DIR         the cluster's directory (data, log, socket)
#   APITOKENS_PG_BIN         the server's bin directory (pg_dump, psql, ...)
#   APITOKENS_PG_CTL         this script, for `stop` and `start`
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

install() {
  if [ -z "$(bin_dir)" ]; then
    echo "postgres.sh: installing PostgreSQL from Debian (once)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends postgresql >&2
  fi
  [ -n "$(bin_dir)" ] || { echo "postgres.sh: no PostgreSQL server under /usr/lib/postgresql" >&2; exit 1; }
}

# The server's user: the current one, or (as root, which the server refuses)
# Debian's `postgres`, else `nobody`.
server_user() {
  if [ "$(id -u)" != 0 ]; then id -un
  elif id postgres >/dev/null 2>&1; then echo postgres
  else echo nobody
  fi
}

as_server() {
  local user; user=$(server_user)
  if [ "$user" = "$(id -un)" ]; then "$@"; else runuser -u "$user" -- "$@"; fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_start() {
  local dir=$1 port; port=$(cat "$dir/port")
  as_server "$(bin_dir)/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
}

pg_stop() {
  as_server "$(bin_dir)/pg_ctl" -D "$1/data" -m immediate -w stop >/dev/null
}

run() {
  install
  local bin dir status=0
  bin=$(bin_dir)
  dir=$(mktemp -d "${TMPDIR:-/tmp}/apitokens-pg.XXXXXX")
  chmod 0755 "$dir"
  [ "$(server_user)" = "$(id -un)" ] || chown "$(server_user)" "$dir"
  cleanup() {
    as_server "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
  }
  trap cleanup EXIT
  as_server "$bin/initdb" -D "$dir/data" -A trust -U apitokens -E UTF8 --no-sync >/dev/null
  # A free port can be taken between the look and the bind: try a few.
  local tries=0
  until free_port >"$dir/port.tmp" && cp "$dir/port.tmp" "$dir/port" && pg_start "$dir" 2>/dev/null; do
    tries=$((tries + 1))
    [ $tries -lt 5 ] || { echo "postgres.sh: the server does not start:" >&2; cat "$dir/postgres.log" >&2; exit 1; }
  done
  export APITOKENS_TEST_POSTGRES="postgres://apitokens@127.0.0.1:$(cat "$dir/port")/postgres"
  export APITOKENS_PG_DIR=$dir APITOKENS_PG_BIN=$bin APITOKENS_PG_CTL=$self
  echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$(cat "$dir/port") ($dir)" >&2
  "$@" || status=$?
  exit $status
}

case "${1:-}" in
  run) shift; [ "${1:-}" = "--" ] && shift; run "$@" ;;
  install) install ;;
  stop) pg_stop "${APITOKENS_PG_DIR:?}" ;;
  start) pg_start "${APITOKENS_PG_DIR:?}" ;;
  *) echo "usage: $0 run -- CMD... | install | stop | start" >&2; exit 2 ;;
esac
