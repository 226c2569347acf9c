#!/usr/bin/env bash
# The floor of this machine for writing N decompressed copies of an image
# to its disk: N local `zstd -dc` of the .zst into files on the disk, each
# fsynced, no network at all. In the lab every receiver shares these cores
# and this disk, so no tool can image N receivers faster than this.
#
#   netlab/bench-disk-floor.sh IMAGE.zst [--n 4] [--rounds 3] [--dir /var/tmp]
set -euo pipefail
ZST=${1:?usage: bench-disk-floor.sh IMAGE.zst [--n 4] [--rounds 3] [--dir /var/tmp]}
shift
N=4 ROUNDS=3 DIR=/var/tmp
while [ $# -gt 0 ]; do
  case "$1" in
    --n) N=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
W=$(mktemp -d "$DIR/rcfloor.XXXXXX")
trap 'rm -rf "$W"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  rm -f "$W"/out*
  sync
  t0=$(date +%s.%N)
  pids=()
  for i in $(seq 1 "$N"); do
    ( zstd -q -dc --sparse "$ZST" > "$W/out$i" && sync "$W/out$i" ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v n="$N" -v r="$r" 'BEGIN { printf "floor N=%d round %d: %.2f s\n", n, r, b - a }'
done
