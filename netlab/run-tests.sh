#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run runs exactly this).
# Installs what the tests need, then: format check, clippy, the layering
# checks (the core builds without I/O; the agent links none of the
# appliance's crates), the core's docs (missing_docs, no broken links),
# the fuzz targets' build, unit and property tests,
# and the network-namespace end-to-end tests (root). Prints how long each
# phase took, and one closing line: passed, failed, skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

phases=()
phase_start=0
phase() { # phase NAME: end the running phase, start NAME
  local now
  now=$(date +%s)
  if [ -n "${phase_name:-}" ]; then
    phases+=("$(printf '%-22s %5ss' "$phase_name" $((now - phase_start)))")
    echo "== $phase_name: $((now - phase_start)) s" >&2
  fi
  phase_name=${1:-}
  phase_start=$now
  [ -z "$phase_name" ] || echo "== $phase_name" >&2
}

phase "install dependencies"
if [ "$(id -u)" = 0 ]; then
  netlab/ensure-deps.sh test
else
  echo "note: not root: the network-namespace tests will be skipped" >&2
fi

phase "fmt"
cargo fmt --all --check

phase "clippy"
cargo clippy --workspace --all-targets -q -- -D warnings

phase "layering"
# The cores without their I/O drivers: no tokio, no socket2.
cargo build -q -p rackcast-core --no-default-features
if cargo tree -p rackcast-core --no-default-features -e normal --prefix none | grep -E '^(tokio|socket2) '; then
  echo "rackcast-core without the io feature depends on tokio or socket2" >&2
  exit 1
fi
# The device side links none of the appliance's crates.
if cargo tree -p rackcast-agent -e normal --prefix none |
    grep -E '^(rusqlite|axum|metrics-exporter-prometheus|dhcproto) '; then
  echo "rackcast-agent links an appliance-only crate" >&2
  exit 1
fi

phase "core docs"
# Every public item of the shared library documented, links resolved.
RUSTDOCFLAGS="-D warnings" cargo doc -q -p rackcast-core --no-deps

phase "fuzz targets build"
(cd fuzz && cargo check -q --bins)

phase "build"
# The netns tests run the other workspace binaries (agent, lab tools).
cargo build --workspace -q

phase "tests"
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
set +e
RACKCAST_SKIP_LOG="$skips" cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
phase ""

echo "phase times:"
for p in "${phases[@]}"; do echo "  $p"; done
if [ -s "$skips" ]; then
  echo "skipped:"
  sed 's/^/  /' "$skips"
fi
# One closing line over all test binaries (cargo prints one per binary,
# the last of which is often an empty doc-test run). A skipped test
# returns early and counts as passed in cargo's line: it is taken out of
# the passed count here and shown as skipped.
awk -v s="$(wc -l <"$skips")" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
