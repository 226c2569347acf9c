#!/usr/bin/env bash
# The data-plane demo (rackcast send / rackcast-agent receive alone): builds rackcast, creates a namespace lab (appliance
# rc-app + 4 devices rc-d1..rc-d4 on a bridge, 500 Mbit/s tbf on the
# appliance, 2 % random loss toward rc-d2), generates a 256 MiB image,
# sends it to all four devices at once over multicast, checks every copy
# and prints the result table and a Prometheus scrape of the sender.
#
#   sudo netlab/demo-dataplane.sh [--mib 256] [--rate 500mbit] [--devices 4] [--loss 2]
#
# Installs missing Debian packages itself. Removes its namespaces and
# processes when it ends.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MIB=256 RATE=500mbit N=4 LOSS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --devices) N=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo-dataplane.sh: run as root (it creates network namespaces)" >&2; exit 2; }
"$HERE/ensure-deps.sh" demo
command -v cargo >/dev/null || { echo "demo-dataplane.sh: needs a Rust toolchain (cargo)" >&2; exit 2; }

P=rc-
WORK=/dev/shm/rcdemo.$$
. "$HERE/common.sh"
lab_cleanup_on_exit "$N"
mkdir -p "$WORK"

echo "== building (release)"
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"
RATE_M=$(( $(rate_bps "$RATE") / 1000000 ))

echo "== lab: ${P}app + ${P}d1..${P}d$N, $RATE on the appliance, $LOSS % loss toward ${P}d2"
"$HERE/lab.sh" up "$P" "$N" --rate "$RATE" --loss "2=$LOSS"

echo "== image: $MIB MiB"
"$BIN/rc-mkimage" "$WORK/image" --mib "$MIB" --zero-every 16 --seed 42
"$BIN/rackcast" manifest "$WORK/image"

echo "== receivers start (each is rackcast-agent in its own namespace)"
for i in $(seq 1 "$N"); do
  timeout 300 ip netns exec "${P}d$i" "$BIN/rackcast-agent" receive --server 198.18.0.1:7000 \
    --iface d0 --out "$WORK/disk$i" --json --log warn >"$WORK/rx$i.log" 2>&1 &
  PIDS+=($!)
done

echo "== sending"
t0=$(date +%s.%N)
rc=0
timeout 300 ip netns exec "${P}app" "$BIN/rackcast" send "$WORK/image" --manifest "$WORK/image.rcmanifest" \
  --iface srv0 --group 239.255.1.1:9000 --control 198.18.0.1:7000 --rate "${RATE_M}M" \
  --receivers "$N" --metrics 198.18.0.1:9464 --json --log warn >"$WORK/send.log" 2>&1 &
SPID=$!; PIDS+=("$SPID")
# Scrape the live exporter while the wave runs (Prometheus text format).
sleep 2
ip netns exec "${P}app" curl -s --max-time 2 http://198.18.0.1:9464/metrics >"$WORK/metrics.txt" || true
wait "$SPID" || rc=$?
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || rc=$?; done
t1=$(date +%s.%N)

echo
grep -v '^{' "$WORK/send.log" | grep -v '^rackcast send' || true
echo
printf '%-6s %-10s %-9s %-12s %s\n' device verdict seconds "goodput" "sha256 matches image"
want=$(sha256sum "$WORK/image" | cut -d' ' -f1)
for i in $(seq 1 "$N"); do
  line=$(grep '^{' "$WORK/rx$i.log" | tail -n1)
  verdict=$(echo "$line" | sed -n 's/.*"verified":\([a-z]*\).*/\1/p')
  secs=$(echo "$line" | sed -n 's/.*"seconds":\([0-9.]*\).*/\1/p')
  got=$(sha256sum "$WORK/disk$i" 2>/dev/null | cut -d' ' -f1)
  gp=$(awk -v s="$secs" -v m="$MIB" 'BEGIN { if (s > 0) printf "%.0f Mbit/s", m * 8388608 / s / 1e6; else print "-" }')
  printf '%-6s %-10s %-9s %-12s %s\n' "d$i" "$([ "$verdict" = true ] && echo VERIFIED || echo FAILED)" "${secs:0:5}" "$gp" "$([ "$got" = "$want" ] && echo yes || echo NO)"
done
echo
echo "wall time (sender start to last receiver): $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f s", b - a }')"
echo "metrics scraped mid-wave:"
grep -E '^rackcast_(rate_bps|packets_sent_total|bytes_sent_total|repair_packets_total|receiver_progress_ratio)' "$WORK/metrics.txt" | head -n 12 || echo "  (no scrape)"
exit "$rc"
