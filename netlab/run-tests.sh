#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run runs exactly this).
# Installs what the tests need, then: format check, clippy, unit and
# property tests, and the network-namespace end-to-end tests (root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  netlab/ensure-deps.sh test
else
  echo "note: not root: the network-namespace tests will be skipped" >&2
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets -q -- -D warnings
# The netns tests run the other workspace binaries (agent, lab tools).
cargo build --workspace -q
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line over all test binaries (cargo prints one per binary,
# the last of which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
