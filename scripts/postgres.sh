#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1, for the tests and the replica benchmark.
#
#   scripts/postgres.sh start DIR   initdb + pg_ctl start in DIR; prints the admin URL
#   scripts/postgres.sh stop DIR    pg_ctl stop, then removes DIR
#
# Installs the distribution's `postgresql` package where it is missing (Debian/Ubuntu, as
# root). The server runs as the `postgres` user when started by root (initdb refuses
# root), trusts local connections and listens on loopback only.
set -euo pipefail

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ]; then
            echo "$d"
            return
        fi
    done
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cmd="${1:?usage: postgres.sh start|stop DIR}"
dir="${2:?usage: postgres.sh start|stop DIR}"

bin="$(find_bin)"
if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing postgresql from the distribution's packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends postgresql >&2 ||
            { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends postgresql >&2; }
        bin="$(find_bin)"
    fi
    if [ -z "$bin" ]; then
        echo "error: PostgreSQL (initdb, pg_ctl) is not installed and cannot be installed here" >&2
        exit 1
    fi
fi

case "$cmd" in
start)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c max_connections=400" \
        start >/dev/null ||
        { cat "$dir/data/server.log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
