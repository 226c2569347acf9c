# Shared pieces of the netlab job scripts (sourced, not run).
# Callers set HERE (this folder), P (namespace prefix), WORK (scratch dir)
# and add the PIDs they start to PIDS; lab_cleanup_on_exit N [DIR...] then
# stops those PIDs, removes the N-device lab, the scratch dir and any DIR
# given on any exit (one trap: a second `trap ... EXIT` would replace it).

PIDS=()

lab_cleanup_on_exit() {
  LAB_N=$1
  shift
  LAB_DIRS=("$@")
  trap 'for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
        "$HERE/lab.sh" down "$P" "$LAB_N" || true
        rm -rf "$WORK" "${LAB_DIRS[@]+"${LAB_DIRS[@]}"}"' EXIT INT TERM
}

# tc-style rate (500mbit, 1gbit, 800kbit) -> bit/s
rate_bps() {
  awk -v r="$1" 'BEGIN { m = 1; if (r ~ /gbit$/) m = 1e9; else if (r ~ /mbit$/) m = 1e6; else if (r ~ /kbit$/) m = 1e3; sub(/[a-z]+$/, "", r); printf "%d", r * m }'
}
