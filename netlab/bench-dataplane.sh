#!/usr/bin/env bash
# Side-by-side data-plane benchmark: rackcast vs udpcast vs UFTP vs N
# parallel HTTP downloads, same random image, same namespace lab (tbf rate
# on the sender, nftables random loss toward every receiver). Every
# receiver's copy is checksum-verified. Prints a table and one JSON line
# per run.
#
#   netlab/bench-dataplane.sh [--mib 256] [--rate 500mbit]
#       [--cases "4:0 4:2 1:0 8:0"] [--tools "rackcast udpcast uftp http"]
#       [--rounds 1] [--timeout 120]
#
# With --rounds R every case runs its tools interleaved R times (A B C A B
# C ...) in one lab, and a closing table gives each tool's median wall
# time with its range. Tool `rackcast-alt` is rackcast with the binaries
# of another build, RC_ALT_BIN=/path/to/target/release (to compare two
# versions side by side in one run).
#
# RC_SEND_ARGS (environment) is appended to `rackcast send`, to compare
# sender settings in one lab, e.g. RC_SEND_ARGS="--source-resend-factor 1".
# RC_RX_PREFIX is put before every rackcast receiver's command, to profile
# it, e.g. RC_RX_PREFIX="perf record -g -o /tmp/rx.perf" with one receiver.
# RC_RX_LOG sets the rackcast receivers' log level (default warn); when it
# is set, their logs' last lines (matching the regex RC_RX_GREP, if set)
# are printed after each run. RC_SEND_LOG sets the sender's log level; when
# it is set, the sender's log is kept as $RC_SEND_LOG_DIR/send-N-LOSS.log
# (default /tmp). RC_KEEP_LOGS=DIR keeps every tool's sender log of every
# run there (TOOL-N-LOSS-ROUND.log), e.g. to read UFTP's NAK counts.
#
# A case is N:LOSS_PERCENT. Run as root. Lab: 198.18.0.0/24, groups in
# 239.255.0.0/16, namespaces rcb-*; everything it starts is stopped by PID
# and the namespaces are removed on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MIB=256 RATE=500mbit CASES="4:0 4:2 1:0 8:0" TOOLS="rackcast udpcast uftp http" TMO=120 ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --cases) CASES=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --timeout) TMO=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-dataplane.sh: run as root (network namespaces)" >&2; exit 2; }
"$HERE/ensure-deps.sh" bench

P=rcb-
MAXN=0
for c in $CASES; do n=${c%%:*}; [ "$n" -gt "$MAXN" ] && MAXN=$n; done
WORK=/dev/shm/rcbench.$$
mkdir -p "$WORK"
. "$HERE/common.sh"
lab_cleanup_on_exit "$MAXN"

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"
IMG="$WORK/image"
"$BIN/rc-mkimage" "$IMG" --mib "$MIB" --seed 7
"$BIN/rackcast" manifest "$IMG" >/dev/null
WANT=$(sha256sum "$IMG" | cut -d' ' -f1)
BYTES=$(stat -c %s "$IMG")
RATE_BPS=$(rate_bps "$RATE")
RATE_M=$((RATE_BPS / 1000000))

now() { date +%s.%N; }

# verify N files; prints number of good copies
verify() {
  local good=0 f
  for f in "$@"; do
    if [ -f "$f" ] && [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$WANT" ]; then good=$((good + 1)); fi
  done
  echo "$good"
}

# sum of user+sys seconds from /usr/bin/time files
cpu_sum() { [ -n "${RC_CPU_SPLIT:-}" ] && cat "$@" >&2; awk '{ s += $1 + $2 } END { printf "%.2f", s }' "$@" 2>/dev/null || echo 0; }

ROWS=()
SECS=()
report() { # tool n loss seconds good rxcpu
  local tool=$1 n=$2 loss=$3 secs=$4 good=$5 rxcpu=$6
  local goodput ratio cpu_per
  goodput=$(awk -v b="$BYTES" -v s="$secs" 'BEGIN { printf "%.1f", b * 8 / s / 1e6 }')
  ratio=$(awk -v b="$BYTES" -v s="$secs" -v r="$RATE_BPS" 'BEGIN { printf "%.3f", b * 8 / s / r }')
  # receiver CPU in core-seconds per Gbit delivered (= cores per Gbit/s)
  cpu_per=$(awk -v c="$rxcpu" -v n="$n" -v b="$BYTES" 'BEGIN { printf "%.3f", c / n / (b * 8 / 1e9) }')
  printf '%-9s N=%-2s loss=%-3s rate=%-8s %7.2f s  goodput %7s Mbit/s  ratio %s  verified %s/%s  rx_cpu %s core/Gbps\n' \
    "$tool" "$n" "$loss%" "$RATE" "$secs" "$goodput" "$ratio" "$good" "$n" "$cpu_per"
  ROWS+=("{\"tool\":\"$tool\",\"n\":$n,\"rate_bps\":$RATE_BPS,\"loss_pct\":$loss,\"seconds\":$secs,\"goodput_mbps\":$goodput,\"ratio\":$ratio,\"verified\":$good,\"rx_cpu_core_per_gbps\":$cpu_per,\"bytes\":$BYTES}")
}

run_rackcast-alt() {
  [ -x "${RC_ALT_BIN:-}/rackcast" ] || { echo "rackcast-alt: set RC_ALT_BIN to a target/release dir" >&2; echo "0 0 0"; return; }
  RBIN=$RC_ALT_BIN run_rackcast "$1"
}

run_rackcast() { local n=$1 i t0 t1 rc=0 BIN=${RBIN:-$BIN}
  local pids=()
  for i in $(seq 1 "$n"); do
    rm -f "$WORK/d$i.out" "$WORK/d$i.out.rcresume"
    timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      ${RC_RX_PREFIX:-} "$BIN/rackcast-agent" receive --server 198.18.0.1:7000 --out "$WORK/d$i.out" --iface d0 --log "${RC_RX_LOG:-warn}" \
      >"$WORK/d$i.log" 2>&1 &
    pids+=($!)
  done
  PIDS+=("${pids[@]}")
  t0=$(now)
  timeout "$TMO" ip netns exec "${P}app" "$BIN/rackcast" send "$IMG" --manifest "$IMG.rcmanifest" \
    --iface srv0 --group 239.255.3.1:9000 --control 198.18.0.1:7000 --rate "${RATE_M}M" \
    --receivers "$n" --json --log "${RC_SEND_LOG:-warn}" ${RC_SEND_ARGS:-} >"$WORK/send.log" 2>&1 || rc=$?
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  t1=$(now)
  [ "$rc" = 0 ] || { echo "rackcast run failed (rc=$rc):" >&2; tail -n 5 "$WORK/send.log" >&2; }
  grep -m1 '^wave:' "$WORK/send.log" | sed 's/^/  rackcast sender: /' >&2 || true
  if [ -n "${RC_SEND_LOG:-}" ]; then cp "$WORK/send.log" "${RC_SEND_LOG_DIR:-/tmp}/send-$n-${CUR_LOSS:-x}.log"; fi
  if [ -n "${RC_RX_LOG:-}" ]; then
    for i in $(seq 1 "$n"); do { grep -E "${RC_RX_GREP:-.}" "$WORK/d$i.log" || true; } | tail -n 6 | sed "s/^/  d$i: /" >&2; done
  fi
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.out"; done)) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$WORK/d$i.out"; done
}

run_udpcast() { local n=$1 i t0 t1 rc=0
  local pids=()
  for i in $(seq 1 "$n"); do
    rm -f "$WORK/d$i.out"
    timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      udp-receiver --file "$WORK/d$i.out" --interface d0 --nokbd --portbase 9100 \
      --mcast-rdv-address 239.255.4.1 >"$WORK/d$i.log" 2>&1 &
    pids+=($!)
  done
  PIDS+=("${pids[@]}")
  sleep 0.3
  t0=$(now)
  timeout "$TMO" ip netns exec "${P}app" udp-sender --file "$IMG" --interface srv0 --portbase 9100 \
    --mcast-rdv-address 239.255.4.1 --mcast-data-address 239.255.4.2 --max-bitrate "${RATE_M}m" \
    --nokbd --min-receivers "$n" --rexmit-hello-interval 100 --retries-until-drop 30 \
    >"$WORK/send.log" 2>&1 || rc=$?
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  t1=$(now)
  [ "$rc" = 0 ] || echo "udpcast run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.out"; done)) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$WORK/d$i.out"; done
}

run_uftp() { local n=$1 i t0 t1 rc=0 ids=""
  local pids=()
  for i in $(seq 1 "$n"); do
    rm -rf "$WORK/u$i"; mkdir -p "$WORK/u$i"
    ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      timeout "$TMO" uftpd -d -q -I d0 -M 239.255.2.1 -D "$WORK/u$i" -B 4194304 >"$WORK/d$i.log" 2>&1 &
    pids+=($!)
    ids="$ids${ids:+,}$(printf '0x%02X%02X%02X%02X' 198 18 0 $((10 + i)))"
  done
  PIDS+=("${pids[@]}")
  sleep 0.5
  t0=$(now)
  timeout "$TMO" ip netns exec "${P}app" uftp -I srv0 -M 239.255.2.1 -P 239.255.2.2 -R $((RATE_BPS / 1000)) \
    -B 4194304 -Y none -H "$ids" "$IMG" >"$WORK/send.log" 2>&1 || rc=$?
  t1=$(now)
  # uftpd runs until killed; stop the ones we started. Each PID is
  # /usr/bin/time (which ignores SIGINT) over `timeout`: signal its child,
  # `timeout` passes the signal on to uftpd.
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "$rc" = 0 ] || echo "uftp run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(for i in $(seq 1 "$n"); do echo "$WORK/u$i/image"; done)) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  rm -rf "$WORK"/u*
}

run_http() { local n=$1 i t0 t1 rc=0 srv
  ip netns exec "${P}app" /usr/bin/python3 -m http.server 8080 --bind 198.18.0.1 --directory "$WORK" >/dev/null 2>&1 &
  srv=$!; PIDS+=("$srv")
  for _ in $(seq 1 50); do
    ip netns exec "${P}d1" curl -sf -o /dev/null "http://198.18.0.1:8080/" && break
    sleep 0.1
  done
  local pids=()
  t0=$(now)
  for i in $(seq 1 "$n"); do
    timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      curl -sf -o "$WORK/d$i.out" "http://198.18.0.1:8080/image" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  t1=$(now)
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
  [ "$rc" = 0 ] || echo "http run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.out"; done)) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$WORK/d$i.out"; done
}

echo "image: $MIB MiB random, sha256 $WANT; rate $RATE (tbf on the sender); loss toward every receiver" >&2
for c in $CASES; do
  n=${c%%:*} loss=${c#*:}
  losses=()
  for i in $(seq 1 "$n"); do losses+=(--loss "$i=$loss"); done
  CUR_LOSS=$loss
  "$HERE/lab.sh" up "$P" "$n" --rate "$RATE" "${losses[@]}"
  for round in $(seq 1 "$ROUNDS"); do
    for tool in $TOOLS; do
      read -r secs good rxcpu < <("run_$tool" "$n")
      report "$tool" "$n" "$loss" "$secs" "$good" "$rxcpu"
      if [ -n "${RC_KEEP_LOGS:-}" ]; then
        mkdir -p "$RC_KEEP_LOGS"
        cp "$WORK/send.log" "$RC_KEEP_LOGS/$tool-$n-$loss-$round.log" 2>/dev/null || true
      fi
      SECS+=("$n:$loss $tool $secs $good $n")
    done
  done
  "$HERE/lab.sh" down "$P" "$n"
done
for r in "${ROWS[@]}"; do echo "$r"; done
if [ "$ROUNDS" -gt 1 ]; then
  echo "medians over $ROUNDS interleaved rounds (wall seconds, range; verified copies/expected):"
  printf '%s\n' "${SECS[@]}" | awk '
    { k = $1 " " $2; v[k] = v[k] " " $3; ok[k] += $4; want[k] += $5; if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
    END {
      for (i = 1; i <= n; i++) {
        k = order[i]; m = split(substr(v[k], 2), a, " ")
        for (x = 1; x <= m; x++) for (y = x + 1; y <= m; y++) if (a[y] + 0 < a[x] + 0) { t = a[x]; a[x] = a[y]; a[y] = t }
        med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
        split(k, kk, " ")
        printf "  case %-6s %-13s median %6.2f s  range %.2f-%.2f  verified %d/%d\n", kk[1], kk[2], med, a[1], a[m], ok[k], want[k]
      }
    }'
fi
