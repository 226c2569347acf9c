#!/usr/bin/env bash
# A relay against one segment, side by side: the same image to 2N
# receivers, either all on the sender's segment ("flat") or N there and N
# on a second segment behind a router with no multicast routing, reached
# through `rackcast relay` ("relay"). Runs interleaved (flat relay flat
# relay ...) in one lab; every copy is compared with the source byte for
# byte; a run's time is from the start of the sender to the last copy
# made durable (`sync FILE` inside the timed window, copies on the disk
# in /var/tmp unless --tmpfs).
#
#   netlab/bench-relay.sh [--mib 128] [--rate 200M] [--n 4] [--rounds 3]
#       [--loss PCT] [--timeout 120] [--tmpfs] [--compressible]
#
# --loss gives every receiver (and the router's port, so the relay's copy
# too) that random loss. Prints one line per run, one JSON line per run,
# and the medians with their ranges. Lab: 198.18.0.0/24 and
# 198.18.2.0/24, groups 239.255.7.1 and 239.255.8.1, namespaces rcr-*;
# everything it starts is stopped by PID and the namespaces are removed
# on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MIB=128 RATE=200M N=4 ROUNDS=3 LOSS=0 TMO=120 DISK=1 COMP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --n) N=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    --timeout) TMO=$2; shift 2 ;;
    --tmpfs) DISK=0; shift ;;
    --compressible) COMP=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-relay.sh: run as root (network namespaces)" >&2; exit 2; }
"$HERE/ensure-deps.sh" bench

P=rcr-
WORK=/dev/shm/rcrelay.$$
OUT=$WORK
[ "$DISK" = 1 ] && OUT=/var/tmp/rcrelay-out.$$
mkdir -p "$WORK" "$OUT"
. "$HERE/common.sh"
lab_cleanup_on_exit $((2 * N)) "$OUT"

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"
# The sender's own pacing sets the rate; the tbf on its port only has to
# carry the wave and the relay's copy.
"$HERE/lab.sh" up "$P" $((2 * N)) --rate 2gbit
"$HERE/lab.sh" segment "$P" "$N"
if [ "$LOSS" != 0 ]; then
  for i in $(seq 1 $((2 * N))); do "$HERE/lab.sh" loss "$P" "$i" "$LOSS"; done
  for i in $(seq 1 "$N"); do "$HERE/lab.sh" portloss "$P" x-sw2 "ve$i" "$LOSS"; done
  "$HERE/lab.sh" portloss "$P" sw vx-rt "$LOSS"
fi

IMG="$WORK/image"
FR=()
if [ "$COMP" = 1 ]; then
  "$BIN/rc-mkimage" "$IMG" --mib "$MIB" --seed 7 --compressible --zero-every 5
  "$BIN/rackcast" manifest "$IMG" --zstd 3 --frames "$IMG.rcblocks" >/dev/null
  FR=(--frames "$IMG.rcblocks")
else
  "$BIN/rc-mkimage" "$IMG" --mib "$MIB" --seed 7
  "$BIN/rackcast" manifest "$IMG" >/dev/null
fi
sync

now() { date +%s.%N; }

# receive NS SERVER IFACE OUT: one receiver in the background.
receive() {
  rm -f "$4" "$4.rcresume"
  timeout "$TMO" ip netns exec "$P$1" "$BIN/rackcast-agent" receive --server "$2" \
    --iface "$3" --out "$4" --log warn --json >"$4.log" 2>&1 &
  PIDS+=($!)
}

# One run of MODE: prints "seconds good".
run() { local mode=$1 i t0 t1 pids=() files=() total
  total=$((2 * N))
  t0=$(now)
  if [ "$mode" = flat ]; then
    for i in $(seq 1 "$total"); do receive "d$i" 198.18.0.1:7000 d0 "$OUT/d$i.out"; pids+=($!); files+=("$OUT/d$i.out"); done
  else
    for i in $(seq 1 "$N"); do receive "d$i" 198.18.0.1:7000 d0 "$OUT/d$i.out"; pids+=($!); files+=("$OUT/d$i.out"); done
    for i in $(seq 1 "$N"); do receive "x-e$i" 198.18.2.1:7001 e0 "$OUT/e$i.out"; pids+=($!); files+=("$OUT/e$i.out"); done
    rm -rf "$OUT/relay"
    timeout "$TMO" ip netns exec "${P}x-rly" "$BIN/rackcast" relay --upstream 198.18.0.1:7000 \
      --name relay --cache "$OUT/relay" --iface r0 --group 239.255.8.1:9000 \
      --control 198.18.2.1:7001 --rate "$RATE" --receivers "$N" --log warn --json \
      >"$WORK/relay.log" 2>&1 &
    PIDS+=($!); pids+=($!)
  fi
  local senders=$N
  [ "$mode" = flat ] && senders=$total
  [ "$mode" = relay ] && senders=$((N + 1))
  timeout "$TMO" ip netns exec "${P}app" "$BIN/rackcast" send "$IMG" --manifest "$IMG.rcmanifest" "${FR[@]}" \
    --iface srv0 --group 239.255.7.1:9000 --control 198.18.0.1:7000 --rate "$RATE" \
    --receivers "$senders" --log warn --json >"$WORK/send.log" 2>&1 &
  PIDS+=($!); pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || true; done
  for f in "${files[@]}"; do [ -e "$f" ] && sync "$f"; done
  t1=$(now)
  local good=0
  for f in "${files[@]}"; do cmp -s "$IMG" "$f" && good=$((good + 1)); done
  awk -v a="$t0" -v b="$t1" -v g="$good" 'BEGIN { printf "%.2f %d\n", b - a, g }'
}

FLAT=() RELAY=()
for r in $(seq 1 "$ROUNDS"); do
  for mode in flat relay; do
    read -r secs good < <(run "$mode")
    printf '%-5s round %d: %6.2f s, verified %d/%d\n' "$mode" "$r" "$secs" "$good" $((2 * N))
    echo "{\"mode\":\"$mode\",\"round\":$r,\"seconds\":$secs,\"verified\":$good,\"n\":$((2 * N)),\"mib\":$MIB,\"rate\":\"$RATE\",\"loss_pct\":$LOSS,\"disk\":$DISK,\"compressible\":$COMP}"
    if [ "$mode" = flat ]; then FLAT+=("$secs"); else RELAY+=("$secs"); fi
  done
done
med() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2f [%.2f-%.2f]", m, a[1], a[NR] }'; }
echo "flat  (${#FLAT[@]} runs): $(med "${FLAT[@]}") s"
echo "relay (${#RELAY[@]} runs): $(med "${RELAY[@]}") s"
