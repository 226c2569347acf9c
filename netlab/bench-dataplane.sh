#!/usr/bin/env bash
# Side-by-side data-plane benchmark: rackcast vs udpcast vs UFTP vs N
# parallel HTTP downloads, same random image, same namespace lab (tbf rate
# on the sender, nftables random loss toward every receiver). Every
# receiver's copy is checksum-verified. Prints a table and one JSON line
# per run.
#
#   netlab/bench-dataplane.sh [--mib 256] [--rate 500mbit]
#       [--cases "4:0 4:2 1:0 8:0"] [--tools "rackcast udpcast uftp http"]
#       [--rounds 1] [--timeout 120] [--image random|os] [--disk]
#       [--os-mib 2048] [--os-parts "etc usr/bin ..."] [--zstd-level 6]
#       [--os-image PATH] [--slow "K:RATE ..."] [--loss "K=PCT ..."]
#       [--pin-neigh]
#
# Neighbour (ARP) entries are the kernel's own, as in a rack; --pin-neigh
# pins them in the lab (`lab.sh --pin-neigh`), which hides what resolving
# them across a lossy link costs.
#
# --slow "1:100mbit" limits receiver 1's switch port (a tbf with a 50 ms
# queue: a slow port, NIC or disk); --loss "1=20" gives receiver 1 that
# random loss instead of the case's. Each run then also prints every
# receiver's own time (its process's end, or for UFTP its file complete),
# and the closing table gives, per tool, the median of the slowest
# receiver without a --slow/--loss mark ("others") and of the slowest
# marked one.
#
# --image os builds a real OS image (`netlab/mk-os-image.sh`: ext4 holding
# this Debian machine's /etc, /usr/bin, /usr/sbin, /usr/lib/x86_64-linux-gnu)
# and runs the peers the way users run them on such images: udpcast sends
# the zstd-compressed image and receivers pipe it through `zstd -dc` (the
# Clonezilla way), HTTP downloads the .zst and decompresses it, UFTP sends
# the raw image; rackcast sends its prepared blocks (`rackcast manifest
# --zstd`). Compression happens once, before the runs, for every tool.
# --os-image PATH reuses an OS image built before (by mk-os-image.sh) and
# its prepared files next to it (PATH.rcmanifest, PATH.rcblocks, PATH.zst,
# made once if missing), to repeat runs without rebuilding it.
# --disk (implied by --image os) puts every receiver's copy on the disk
# (/var/tmp), not tmpfs, and each run's time ends only after every copy
# was fsynced (`sync FILE`, for every tool alike).
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
IMAGE=random DISK=0 OS_IMAGE= OS_MIB=2048 ZLEVEL=6 OS_PARTS="etc usr/bin usr/sbin usr/lib/x86_64-linux-gnu"
SLOW="" XLOSS="" PIN=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --cases) CASES=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --timeout) TMO=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --disk) DISK=1; shift ;;
    --os-mib) OS_MIB=$2; shift 2 ;;
    --os-image) OS_IMAGE=$2; IMAGE=os; shift 2 ;;
    --os-parts) OS_PARTS=$2; shift 2 ;;
    --zstd-level) ZLEVEL=$2; shift 2 ;;
    --slow) SLOW=$2; shift 2 ;;
    --loss) XLOSS=$2; shift 2 ;;
    --pin-neigh) PIN=(--pin-neigh); shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-dataplane.sh: run as root (network namespaces)" >&2; exit 2; }
"$HERE/ensure-deps.sh" bench

P=rcb-
MAXN=0
for c in $CASES; do n=${c%%:*}; [ "$n" -gt "$MAXN" ] && MAXN=$n; done
case "$IMAGE" in random) ;; os) DISK=1 ;; *) echo "--image random|os" >&2; exit 2 ;; esac
WORK=/dev/shm/rcbench.$$
# Receivers' copies: tmpfs, or the disk with --disk.
OUT=$WORK
[ "$DISK" = 1 ] && OUT=/var/tmp/rcbench-out.$$
mkdir -p "$WORK" "$OUT"
. "$HERE/common.sh"
lab_cleanup_on_exit "$MAXN" "$OUT"

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"
if [ "$IMAGE" = os ]; then
  # The source on the disk too: 2 GiB is no tmpfs image.
  IMG="$OUT/image"
  if [ -n "$OS_IMAGE" ]; then
    IMG=$OS_IMAGE
    [ -f "$IMG" ] || { echo "--os-image $IMG: no such file" >&2; exit 2; }
  else
    "$HERE/mk-os-image.sh" "$IMG" --size-mib "$OS_MIB" --parts "$OS_PARTS"
  fi
  if [ -z "$OS_IMAGE" ] || [ ! -f "$IMG.rcblocks" ] || [ ! -f "$IMG.rcmanifest" ]; then
    "$BIN/rackcast" manifest "$IMG" --zstd "$ZLEVEL" --frames "$IMG.rcblocks" >&2
  fi
  if [ -z "$OS_IMAGE" ] || [ ! -f "$IMG.zst" ]; then
    zstd -q -f -T0 "-$ZLEVEL" "$IMG" -o "$IMG.zst"
  fi
  echo "peers' .zst (zstd -$ZLEVEL): $(stat -c %s "$IMG.zst") bytes; rackcast's blocks: $(stat -c %s "$IMG.rcblocks") bytes" >&2
  RC_FRAMES=(--frames "$IMG.rcblocks")
else
  IMG="$WORK/image"
  "$BIN/rc-mkimage" "$IMG" --mib "$MIB" --seed 7
  "$BIN/rackcast" manifest "$IMG" >/dev/null
  RC_FRAMES=()
fi
# What the preparation wrote must not be written back during the first
# run (it made the first round of a case seconds slower).
sync
WANT=$(sha256sum "$IMG" | cut -d' ' -f1)
BYTES=$(stat -c %s "$IMG")
RATE_BPS=$(rate_bps "$RATE")
RATE_M=$((RATE_BPS / 1000000))

now() { date +%s.%N; }

# With --disk, a run ends when its copies are on the disk: fsync each one
# (inside the timed window, for every tool alike).
durable() {
  [ "$DISK" = 1 ] || return 0
  local f
  for f in "$@"; do [ -e "$f" ] && sync "$f"; done
  return 0
}
outs() { local i; for i in $(seq 1 "$1"); do echo "$OUT/d$i.out"; done; }

# verify N files; prints number of good copies
verify() {
  local good=0 f
  for f in "$@"; do
    # Byte for byte against the source (faster than hashing every copy
    # of a 2 GiB image; the source stays in the page cache).
    if [ -f "$f" ] && cmp -s "$IMG" "$f"; then
      good=$((good + 1))
    else
      # Where it differs, for whoever looks into it.
      echo "  copy $f differs from the source: $(cmp "$IMG" "$f" 2>&1 | head -n 1)" >&2
    fi
  done
  echo "$good"
}

# sum of user+sys seconds from /usr/bin/time files
cpu_sum() { [ -n "${RC_CPU_SPLIT:-}" ] && cat "$@" >&2; awk '{ s += $1 + $2 } END { printf "%.2f", s }' "$@" 2>/dev/null || echo 0; }

ROWS=()
SECS=()
RXSECS=()
# Receiver K has a --slow or --loss mark.
is_marked() {
  local t
  for t in $SLOW $XLOSS; do [ "${t%%[:=]*}" = "$1" ] && return 0; done
  return 1
}
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
    rm -f "$OUT/d$i.out" "$OUT/d$i.out.rcresume"
    rm -f "$WORK/d$i.end"
    { timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      ${RC_RX_PREFIX:-} "$BIN/rackcast-agent" receive --server 198.18.0.1:7000 --out "$OUT/d$i.out" --iface d0 --log "${RC_RX_LOG:-warn}" --json \
      >"$WORK/d$i.log" 2>&1; rc=$?; now >"$WORK/d$i.end"; exit $rc; } &
    pids+=($!)
  done
  PIDS+=("${pids[@]}")
  t0=$(now); echo "$t0" >"$WORK/t0"
  timeout "$TMO" ip netns exec "${P}app" "$BIN/rackcast" send "$IMG" --manifest "$IMG.rcmanifest" "${RC_FRAMES[@]}" \
    --iface srv0 --group 239.255.3.1:9000 --control 198.18.0.1:7000 --rate "${RATE_M}M" \
    --receivers "$n" --json --log "${RC_SEND_LOG:-warn}" ${RC_SEND_ARGS:-} >"$WORK/send.log" 2>&1 || rc=$?
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  durable $(outs "$n")
  t1=$(now)
  [ "$rc" = 0 ] || { echo "rackcast run failed (rc=$rc):" >&2; tail -n 5 "$WORK/send.log" >&2; }
  # The receivers' own word on their final flush (writeback overlapped).
  for i in $(seq 1 "$n"); do tail -n 1 "$WORK/d$i.log"; done \
    | sed -n 's/.*"flush_seconds":\([0-9.e-]*\).*/\1/p' | sort -g | tail -n 1 | sed 's/^/  rackcast slowest final flush (s): /' >&2 || true
  grep -m1 '^wave:' "$WORK/send.log" | sed 's/^/  rackcast sender: /' >&2 || true
  if [ -n "${RC_SEND_LOG:-}" ]; then cp "$WORK/send.log" "${RC_SEND_LOG_DIR:-/tmp}/send-$n-${CUR_LOSS:-x}.log"; fi
  if [ -n "${RC_RX_LOG:-}" ]; then
    for i in $(seq 1 "$n"); do { grep -E "${RC_RX_GREP:-.}" "$WORK/d$i.log" || true; } | tail -n 6 | sed "s/^/  d$i: /" >&2; done
  fi
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(outs "$n")) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$OUT/d$i.out"; done
}

run_udpcast() { local n=$1 i t0 t1 rc=0
  local pids=()
  for i in $(seq 1 "$n"); do
    rm -f "$OUT/d$i.out"
    # /usr/bin/time counts the pipe's zstd too (its children).
    rm -f "$WORK/d$i.end"
    { timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      udp-receiver --file "$OUT/d$i.out" "${UDP_PIPE[@]}" --interface d0 --nokbd --portbase 9100 \
      --mcast-rdv-address 239.255.4.1 >"$WORK/d$i.log" 2>&1; rc=$?; now >"$WORK/d$i.end"; exit $rc; } &
    pids+=($!)
  done
  PIDS+=("${pids[@]}")
  sleep 0.3
  t0=$(now); echo "$t0" >"$WORK/t0"
  timeout "$TMO" ip netns exec "${P}app" udp-sender --file "$SEND_FILE" --interface srv0 --portbase 9100 \
    --mcast-rdv-address 239.255.4.1 --mcast-data-address 239.255.4.2 --max-bitrate "${RATE_M}m" \
    --nokbd --min-receivers "$n" --rexmit-hello-interval 100 --retries-until-drop 30 \
    >"$WORK/send.log" 2>&1 || rc=$?
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  durable $(outs "$n")
  t1=$(now)
  [ "$rc" = 0 ] || echo "udpcast run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(outs "$n")) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$OUT/d$i.out"; done
}

run_uftp() { local n=$1 i t0 t1 rc=0 ids=""
  local pids=()
  for i in $(seq 1 "$n"); do
    rm -rf "$OUT/u$i"; mkdir -p "$OUT/u$i"
    ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
      timeout "$TMO" uftpd -d -q -I d0 -M 239.255.2.1 -D "$OUT/u$i" -B 4194304 >"$WORK/d$i.log" 2>&1 &
    pids+=($!)
    ids="$ids${ids:+,}$(printf '0x%02X%02X%02X%02X' 198 18 0 $((10 + i)))"
  done
  PIDS+=("${pids[@]}")
  sleep 0.5
  t0=$(now); echo "$t0" >"$WORK/t0"
  # uftpd runs on: a receiver is done when its copy is whole.
  for i in $(seq 1 "$n"); do rm -f "$WORK/d$i.end"; done
  ( for _ in $(seq 1 $((TMO * 20))); do
      left=0
      for i in $(seq 1 "$n"); do
        [ -e "$WORK/d$i.end" ] && continue
        if [ "$(stat -c %s "$OUT/u$i/image" 2>/dev/null || echo 0)" -ge "$BYTES" ]; then now >"$WORK/d$i.end"; else left=1; fi
      done
      [ "$left" = 0 ] && break
      sleep 0.05
    done ) &
  local watcher=$!
  timeout "$TMO" ip netns exec "${P}app" uftp -I srv0 -M 239.255.2.1 -P 239.255.2.2 -R $((RATE_BPS / 1000)) \
    -B 4194304 -Y none -H "$ids" "$IMG" >"$WORK/send.log" 2>&1 || rc=$?
  durable $(for i in $(seq 1 "$n"); do echo "$OUT/u$i/image"; done)
  t1=$(now)
  kill "$watcher" 2>/dev/null || true; wait "$watcher" 2>/dev/null || true
  # uftpd runs until killed; stop the ones we started. Each PID is
  # /usr/bin/time (which ignores SIGINT) over `timeout`: signal its child,
  # `timeout` passes the signal on to uftpd.
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "$rc" = 0 ] || echo "uftp run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(for i in $(seq 1 "$n"); do echo "$OUT/u$i/image"; done)) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  rm -rf "$OUT"/u*
}

run_http() { local n=$1 i t0 t1 rc=0 srv
  ip netns exec "${P}app" /usr/bin/python3 -m http.server 8080 --bind 198.18.0.1 --directory "$(dirname "$SEND_FILE")" >/dev/null 2>&1 &
  srv=$!; PIDS+=("$srv")
  for _ in $(seq 1 50); do
    ip netns exec "${P}d1" curl -sf -o /dev/null "http://198.18.0.1:8080/" && break
    sleep 0.1
  done
  local pids=()
  t0=$(now); echo "$t0" >"$WORK/t0"
  for i in $(seq 1 "$n"); do
    rm -f "$WORK/d$i.end"
    if [ "$IMAGE" = os ]; then
      timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
        sh -c "curl -sf http://198.18.0.1:8080/$(basename "$SEND_FILE") | zstd -d -q -f -o $OUT/d$i.out; r=\$?; date +%s.%N >$WORK/d$i.end; exit \$r" &
    else
      timeout "$TMO" ip netns exec "${P}d$i" /usr/bin/time -f "%U %S" -o "$WORK/d$i.time" \
        sh -c "curl -sf -o $OUT/d$i.out http://198.18.0.1:8080/$(basename "$SEND_FILE"); r=\$?; date +%s.%N >$WORK/d$i.end; exit \$r" &
    fi
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  durable $(outs "$n")
  t1=$(now)
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
  [ "$rc" = 0 ] || echo "http run failed (rc=$rc)" >&2
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(verify $(outs "$n")) $(cpu_sum $(for i in $(seq 1 "$n"); do echo "$WORK/d$i.time"; done))"
  for i in $(seq 1 "$n"); do rm -f "$OUT/d$i.out"; done
}

# What udpcast and HTTP send: the .zst for an OS image (decompressed on
# the receivers), else the raw image.
if [ "$IMAGE" = os ]; then
  SEND_FILE="$IMG.zst"; UDP_PIPE=(--pipe "zstd -dc --sparse")
else
  SEND_FILE=$IMG; UDP_PIPE=()
fi
echo "image: $IMAGE, $BYTES bytes, sha256 $WANT; copies on $([ "$DISK" = 1 ] && echo "disk (fsynced in each run's time)" || echo tmpfs); rate $RATE (tbf on the sender); loss toward every receiver" >&2
for c in $CASES; do
  n=${c%%:*} loss=${c#*:}
  losses=()
  for i in $(seq 1 "$n"); do
    l=$loss
    for t in $XLOSS; do [ "${t%%=*}" = "$i" ] && l=${t#*=}; done
    losses+=(--loss "$i=$l")
  done
  for t in $SLOW; do losses+=(--slow "${t%%:*}=${t#*:}"); done
  CUR_LOSS=$loss
  "$HERE/lab.sh" up "$P" "$n" --rate "$RATE" "${losses[@]}" "${PIN[@]+"${PIN[@]}"}"
  for round in $(seq 1 "$ROUNDS"); do
    for tool in $TOOLS; do
      # Command substitution waits for the whole run, its cleanup
      # included: the next run must not start while this one still
      # removes its copies (which are the next run's file names).
      res=$("run_$tool" "$n")
      read -r secs good rxcpu <<<"$res"
      T0_RUN=$(cat "$WORK/t0" 2>/dev/null || echo 0)
      report "$tool" "$n" "$loss" "$secs" "$good" "$rxcpu"
      if [ -n "$SLOW$XLOSS" ]; then
        per="" others=0 marked=0
        for i in $(seq 1 "$n"); do
          e=$(cat "$WORK/d$i.end" 2>/dev/null || echo "")
          [ -n "$e" ] || { per="$per d$i=-"; continue; }
          s_i=$(awk -v a="$T0_RUN" -v b="$e" 'BEGIN { printf "%.2f", b - a }')
          per="$per d$i=$s_i"
          if is_marked "$i"; then marked=$(awk -v a="$marked" -v b="$s_i" 'BEGIN { print (b > a) ? b : a }')
          else others=$(awk -v a="$others" -v b="$s_i" 'BEGIN { print (b > a) ? b : a }'); fi
        done
        echo "  $tool receivers (s from the sender's start):$per" >&2
        RXSECS+=("$n:$loss $tool $others $marked")
      fi
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
if [ "${#RXSECS[@]}" -gt 0 ]; then
  echo "per receiver, from the sender's start: median (range) of the slowest unmarked receiver and of the slowest marked one (--slow/--loss $SLOW $XLOSS):"
  printf '%s\n' "${RXSECS[@]}" | awk '
    function med(s,   m, a, x, y, t) { m = split(substr(s, 2), a, " ")
      for (x = 1; x <= m; x++) for (y = x + 1; y <= m; y++) if (a[y] + 0 < a[x] + 0) { t = a[x]; a[x] = a[y]; a[y] = t }
      return sprintf("%6.2f (%.2f-%.2f)", (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2, a[1], a[m]) }
    { k = $1 " " $2; o[k] = o[k] " " $3; s[k] = s[k] " " $4; if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
    END { for (i = 1; i <= n; i++) { k = order[i]; split(k, kk, " "); printf "  case %-6s %-13s others %s  marked %s\n", kk[1], kk[2], med(o[k]), med(s[k]) } }'
fi
