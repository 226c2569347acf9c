#!/usr/bin/env bash
# The control plane on SQLite and on PostgreSQL, side by side: fleet-sim
# (N simulated devices through every workflow step against a real
# `rackcast serve`) with the appliance's default SQLite record, then with
# its record in a private PostgreSQL server started for this run in the
# same kind of loopback-only namespace; interleaved (sqlite postgres
# sqlite postgres ...), a fresh database for every run.
#
#   netlab/bench-fleet.sh [--devices 5000] [--rounds 3]
#
# Prints each run's line and JSON, then each store's median seconds and
# peak appliance RSS with ranges. Namespace rcfp-<pid> (loopback only,
# 239.255.40.0/24 on lo), server data in /var/tmp/rcfp-<pid> (the disk,
# as a database's would be); both removed on exit, the server stopped.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=5000 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) N=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-fleet.sh: run as root" >&2; exit 2; }
"$HERE/ensure-deps.sh" test
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
NS=rcfp-$$
DIR=/var/tmp/rcfp-$$
PORT=5439
cleanup() {
  if [ -f "$DIR/data/postmaster.pid" ]; then
    ip netns exec "$NS" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link set lo multicast on
ip -n "$NS" route add 239.255.40.0/24 dev lo
mkdir -p "$DIR"
chown postgres: "$DIR"
PW=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
install -m 600 /dev/null "$DIR/rackcast.pw"
echo "$PW" >"$DIR/rackcast.pw"
runuser -u postgres -- "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth-local=peer \
  --auth-host=scram-sha-256 -E UTF8 >/dev/null
ip netns exec "$NS" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$DIR -c max_connections=60" start >/dev/null
psql_() { ip netns exec "$NS" runuser -u postgres -- psql -h "$DIR" -p "$PORT" -U postgres -qAt -v ON_ERROR_STOP=1 "$@"; }
psql_ -c "CREATE ROLE rackcast LOGIN PASSWORD '$PW'"

run() { # store -> prints "seconds rss_mib done"
  local out
  if [ "$1" = postgres ]; then
    psql_ -c "DROP DATABASE IF EXISTS rackcast" -c "CREATE DATABASE rackcast OWNER rackcast"
    out=$("$BIN/fleet-sim" --devices "$N" --netns "$NS" \
      --store "postgres://rackcast@127.0.0.1:$PORT/rackcast" --store-password-file "$DIR/rackcast.pw" 2>&1) || true
  else
    out=$("$BIN/fleet-sim" --devices "$N" 2>&1) || true
  fi
  echo "$out" | grep -v '^{' | sed "s/^/  [$1] /" >&2
  echo "$out" | grep '^{' | tail -n 1 | python3 -c '
import json, sys
line = sys.stdin.read().strip()
if not line:
    print("fail 0 0")
else:
    d = json.loads(line)
    print("%.2f %.1f %d" % (d["seconds"], d["appliance_peak_rss_mib"], d["devices_done"]))'
}

declare -A SECS RSS
for r in $(seq 1 "$ROUNDS"); do
  for store in sqlite postgres; do
    read -r s m done < <(run "$store")
    printf '%-8s round %d: %s s, peak RSS %s MiB, %s/%s done\n' "$store" "$r" "$s" "$m" "$done" "$N"
    echo "{\"store\":\"$store\",\"round\":$r,\"devices\":$N,\"seconds\":\"$s\",\"rss_mib\":$m,\"done\":$done}"
    SECS[$store]+="$s "
    RSS[$store]+="$m "
  done
done
med() { printf '%s\n' $1 | grep -v fail | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print "no run"; exit } m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2f [%.2f-%.2f]", m, a[1], a[NR] }'; }
for store in sqlite postgres; do
  echo "$store: $(med "${SECS[$store]}") s, peak RSS $(med "${RSS[$store]}") MiB"
done
