#!/usr/bin/env bash
# Interleaved wave-sim runs: each build in BINS runs the same sizes and
# scenario, A B A B ..., ROUNDS times; then each build's median and range
# per size and column. The simulated times are exact for a seed (equal
# across builds that send the same); the CPU columns are this machine's
# and noisy, hence the rounds.
#
#   netlab/bench-wave-sim.sh [--rounds 3] [--receivers 8,100,300,1000]
#       [--scenario clean|mixed] LABEL=BINARY [LABEL=BINARY ...]
#
# clean: no late or killed members; mixed: a quarter 100 ms late, an
# eighth killed half way and restarted. No network, no root needed.
set -euo pipefail
rounds=3 receivers=8,100,300,1000 scenario=clean
bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --receivers) receivers=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    *=*) bins+=("$1"); shift ;;
    *) echo "usage: $0 [--rounds R] [--receivers LIST] [--scenario clean|mixed] LABEL=BINARY..." >&2; exit 2 ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || { echo "name at least one LABEL=BINARY" >&2; exit 2; }
case $scenario in
  clean) extra=(--late-every 0 --kill-every 0) ;;
  mixed) extra=(--late-every 4 --kill-every 8) ;;
  *) echo "scenario: clean or mixed" >&2; exit 2 ;;
esac
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  for b in "${bins[@]}"; do
    label=${b%%=*} bin=${b#*=}
    echo "round $r: $label" >&2
    "$bin" --receivers "$receivers" "${extra[@]}" --json | grep '^{' |
      sed "s/^{/{\"build\":\"$label\",\"round\":$r,/" >>"$out"
  done
done
python3 - "$out" "$scenario" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"scenario {sys.argv[2]}; medians of {max(r['round'] for r in rows)} interleaved rounds, [min-max]")
cols = [("wave_ms", "wave ms", 0), ("sender_control_ms", "sender ctl ms", 1),
        ("sender_send_ms", "sender send ms", 1), ("sender_us_per_report", "us/report", 2),
        ("sender_ns_per_datagram", "ns/datagram", 0), ("reports_per_s", "reports/s", 0),
        ("sender_state_bytes", "state B", 0)]
print("| build | receivers | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|" + "---|" * len(cols))
for b in dict.fromkeys(r["build"] for r in rows):
    for n in dict.fromkeys(r["receivers"] for r in rows):
        sel = [r for r in rows if r["build"] == b and r["receivers"] == n]
        cells = []
        for key, _, d in cols:
            v = [r[key] for r in sel]
            m = statistics.median(v)
            cells.append(f"{m:.{d}f} [{min(v):.{d}f}-{max(v):.{d}f}]" if max(v) != min(v) else f"{m:.{d}f}")
        print(f"| {b} | {n} | " + " | ".join(cells) + " |")
EOF
