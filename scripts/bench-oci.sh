#!/usr/bin/env bash
# Push and verified pull through the `delta` CLI against `delta-registry serve`, next to
# the same bytes through a stock OCI registry (distribution's `registry`, Debian's
# `docker-registry` package) with curl, in one run on this machine.
#
#   ./scripts/bench-oci.sh [SIZES_MIB...]      (default: 256 1024; best of 2 runs each)
#
# delta push  = `delta push` of a native delta folder (blake3 of the file, upload, commit
#               after fsync, manifest validated against the base).
# delta pull  = `delta pull` into a fresh cache and output folder (every byte verified,
#               downloaded through the cache's partial file and renamed into the folder).
# --no-cache  = `delta pull --no-cache`: the same without the cache (scratch beside it).
# OCI push    = sha256 of the file (openssl), POST + monolithic PUT of the blob (curl).
# OCI pull    = `curl blob | tee FILE | openssl sha256`, compared with the digest.
# Registry CPU is the server process's user+system seconds per GiB moved (/proc/PID/stat).
#
# Installs docker-registry with apt-get when it is missing and this runs as root;
# otherwise the OCI columns say it is missing. Not part of the test command.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(256 1024)

oci_bin=$(command -v docker-registry || command -v registry || true)
if [ -z "$oci_bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing docker-registry (Debian's distribution registry) ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry >&2 || true
    oci_bin=$(command -v docker-registry || true)
fi

cargo build --release --locked -p delta-client -p delta-registry >&2
delta="$root/target/release/delta"
registry="$root/target/release/delta-registry"

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-oci.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
now() { date +%s.%N; }
mibps() { awk -v mib="$1" -v t="$2" 'BEGIN { printf "%.0f", mib / t }'; }
per_gb() { awk -v c="$1" -v mib="$2" 'BEGIN { printf "%.2f", c / (mib / 1024) }'; }
# start PID: notes the clock and the CPU time of the server PID.
start() { c0=$(cpu_seconds "$1"); t0=$(now); }
# keep NAME PID: if the time since `start` beats best_NAME, keeps it there, and the
# server's CPU seconds since `start` in cpu_NAME.
keep() {
    local t c best="best_$1"
    t=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
    c=$(awk -v a="$c0" -v b="$(cpu_seconds "$2")" 'BEGIN { print b - a }')
    if awk -v t="$t" -v b="${!best}" 'BEGIN { exit !(t < b) }'; then
        printf -v "best_$1" %s "$t"
        printf -v "cpu_$1" %s "$c"
    fi
}

# The delta registry, embedded defaults (SQLite, local disk with fsync).
port=$(free_port)
"$registry" serve --data-dir "$work/delta-data" --listen "127.0.0.1:$port" >"$work/delta.log" 2>&1 &
dpid=$!
pids+=("$dpid")
url="http://127.0.0.1:$port"
for _ in $(seq 100); do grep -q listening "$work/delta.log" && break; sleep 0.1; done

if [ -n "$oci_bin" ]; then
    oport=$(free_port)
    cat >"$work/oci.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/oci-data
http:
  addr: 127.0.0.1:$oport
EOF
    "$oci_bin" serve "$work/oci.yml" >"$work/oci.log" 2>&1 &
    opid=$!
    pids+=("$opid")
    ourl="http://127.0.0.1:$oport"
    for _ in $(seq 100); do curl -sf "$ourl/v2/" >/dev/null && break; sleep 0.1; done
fi

D() { "$delta" --registry "$url" --cache "$work/cache" --credentials "$work/creds.json" "$@"; }

# A base with one F32 tensor and a native delta replacing it (a dense diff), SIZE MiB.
make_pair() {
    python3 - "$1" "$2" <<'PY'
import json, os, struct, sys
mib, out = int(sys.argv[1]), sys.argv[2]
n = mib * (1 << 20) // 4
def write(path, name, data_fn):
    header = json.dumps({name: {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        data_fn(f)
os.makedirs(f"{out}/delta", exist_ok=True)
write(f"{out}/base.safetensors", "w.weight", lambda f: f.truncate(f.tell() + 4 * n))
# Random bytes with each float's exponent kept finite (top byte below 0x40).
finite = bytes(b & 0x3F for b in range(256))
def random_floats(f):
    left = 4 * n
    while left:
        chunk = bytearray(os.urandom(min(left, 64 << 20)))
        chunk[3::4] = chunk[3::4].translate(finite)
        f.write(chunk)
        left -= len(chunk)
write(f"{out}/delta/delta.safetensors", "w.weight.diff", random_floats)
with open(f"{out}/delta/delta.json", "w") as f:
    json.dump({"method": "diff"}, f)
PY
}

# On this VM the first use of a guest memory page costs ~8x a reused one (a 1 GiB write
# took 2.7 s the first time and 0.35 s after): touch 12 GiB of page cache once and free it,
# so that no column pays for fresh pages the others do not.
dd if=/dev/zero of="$work/warm" bs=1M count=12288 status=none
rm -f "$work/warm"

echo
echo "| size | delta push MB/s | OCI push MB/s | push ratio | delta pull MB/s (verified) | delta pull --no-cache | OCI pull MB/s (verified) | pull ratio (--no-cache) | delta registry CPU s/GiB push / pull | OCI registry CPU s/GiB push / pull |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mib in "${sizes[@]}"; do
    best_dpush=999999 best_dpull=999999 best_npull=999999 best_opush=999999 best_opull=999999
    cpu_dpush=0 cpu_dpull=0 cpu_npull=0 cpu_opush=0 cpu_opull=0
    for run in 1 2; do
        # New random bytes each run: neither registry may skip an upload as a duplicate.
        d="$work/data-$mib-$run"
        make_pair "$mib" "$d"
        D base add "base-$mib-$run" "$d/base.safetensors" >/dev/null
        file="$d/delta/delta.safetensors"
        bytes=$(stat -c %s "$file")
        mb=$(awk -v b="$bytes" 'BEGIN { print b / 1e6 }')
        sync
        # delta push: a new repository each run, so every byte travels.
        start "$dpid"
        D push "$d/delta" "bench/d$mib-$run:t" --base "base-$mib-$run" >/dev/null 2>&1
        keep dpush "$dpid"
        # delta pull, then --no-cache, in the other order on the second run: the first
        # pull after a push pays for fresh page-cache pages, so each column pays once and
        # the best of two compares like with like. An empty cache and folder each time.
        if [ "$run" = 1 ]; then pulls=(dpull npull); else pulls=(npull dpull); fi
        for which in "${pulls[@]}"; do
            rm -rf "$work/cache" "$work/out"
            sync
            flag=; [ "$which" = npull ] && flag=--no-cache
            start "$dpid"
            D pull $flag "bench/d$mib-$run:t" -o "$work/out" >/dev/null 2>&1
            keep "$which" "$dpid"
            cmp -s "$file" "$work/out/delta.safetensors" || { echo "pulled file differs" >&2; exit 1; }
        done
        rm -rf "$work/cache" "$work/out"

        if [ -n "$oci_bin" ]; then
            sync
            repo="bench/o$mib-$run"
            start "$opid"
            sha=$(openssl sha256 -r "$file" | cut -d' ' -f1)
            loc=$(curl -sf -X POST -D - -o /dev/null "$ourl/v2/$repo/blobs/uploads/" | tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
            case $loc in http*) ;; *) loc="$ourl$loc" ;; esac
            sep='?'; case $loc in *\?*) sep='&' ;; esac
            curl -sf -T "$file" -H 'Content-Type: application/octet-stream' \
                "$loc${sep}digest=sha256:$sha" -o /dev/null
            keep opush "$opid"
            # Twice, as the delta pulls: the first after the push pays for fresh pages.
            for _ in 1 2; do
                sync
                start "$opid"
                got=$(curl -sf "$ourl/v2/$repo/blobs/sha256:$sha" | tee "$work/oci-out" | openssl sha256 -r | cut -d' ' -f1)
                keep opull "$opid"
                [ "$got" = "$sha" ] || { echo "OCI pull digest differs" >&2; exit 1; }
                rm -f "$work/oci-out"
            done
        fi
        rm -rf "$d"
    done
    dpush=$(mibps "$mb" "$best_dpush") dpull=$(mibps "$mb" "$best_dpull") npull=$(mibps "$mb" "$best_npull")
    dcpu="$(per_gb "$cpu_dpush" "$mib") / $(per_gb "$cpu_dpull" "$mib")"
    if [ -n "$oci_bin" ]; then
        opush=$(mibps "$mb" "$best_opush") opull=$(mibps "$mb" "$best_opull")
        pr=$(awk -v a="$dpush" -v b="$opush" 'BEGIN { printf "%.2f×", a / b }')
        lr=$(awk -v a="$dpull" -v n="$npull" -v b="$opull" 'BEGIN { printf "%.2f× (%.2f×)", a / b, n / b }')
        ocpu="$(per_gb "$cpu_opush" "$mib") / $(per_gb "$cpu_opull" "$mib")"
    else
        opush="(no OCI registry)" opull="-" pr="-" lr="-" ocpu="-"
    fi
    echo "| $mib MiB | $dpush | $opush | $pr | $dpull | $npull | $opull | $lr | $dcpu | $ocpu |"
done
