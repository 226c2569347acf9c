#!/usr/bin/env bash
# Build a real OS image for benchmarks and the demo: an ext4 file system
# holding this Debian machine's /etc, /usr/bin, /usr/sbin and
# /usr/lib/x86_64-linux-gnu (the files of its installed Debian packages),
# like a root partition after an install: mostly zero blocks where the
# file system is empty, compressible binaries and text elsewhere.
#
#   netlab/mk-os-image.sh OUT [--size-mib 2048] [--parts "etc usr/bin ..."]
#
# The tree is hard-linked (same file system) or copied into a temporary
# directory, then `mkfs.ext4 -d` writes it into OUT. Nothing outside OUT
# and the temporary directory is touched.
set -euo pipefail
OUT=${1:?usage: mk-os-image.sh OUT [--size-mib N] [--parts "..."]}
shift
SIZE=2048
PARTS="etc usr/bin usr/sbin usr/lib/x86_64-linux-gnu"
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) SIZE=$2; shift 2 ;;
    --parts) PARTS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v mkfs.ext4 >/dev/null || { echo "mk-os-image.sh: mkfs.ext4 missing (e2fsprogs)" >&2; exit 2; }
TREE=$(mktemp -d "$(dirname "$OUT")/.rcos-tree.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
for p in $PARTS; do
  mkdir -p "$TREE/$(dirname "$p")"
  cp -al "/$p" "$TREE/$p" 2>/dev/null || cp -a "/$p" "$TREE/$p"
done
rm -f "$OUT"
# Fixed UUID, hash seed and time: fewer differences between builds (file
# contents and their order still follow the machine).
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L rackcast-os -U 6c1ad3e2-0b4e-4d0b-9a55-1f0c2a6e7d11 \
  -E root_owner=0:0,hash_seed=0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7 -d "$TREE" "$OUT" "${SIZE}M"
echo "$OUT: ${SIZE} MiB ext4 from /$(echo $PARTS | sed 's| | /|g') ($(du -sh --apparent-size "$TREE" | cut -f1) of files)" >&2
