#!/usr/bin/env bash
# Installs the Debian packages a netlab job needs, only if missing.
#   ensure-deps.sh test|demo|bench
set -euo pipefail
need=(iproute2 nftables time procps curl binutils python3)
case "${1:-test}" in
  # PXE end to end: QEMU (software emulation), Debian's iPXE ROMs and
  # binaries, OVMF for UEFI, a kernel and cpio/kmod for the loader initrd.
  test) need+=(prometheus busybox-static isc-dhcp-client dnsmasq-base tftp-hpa atftp
               qemu-system-x86 ipxe-qemu ipxe ovmf linux-image-amd64 cpio kmod) ;;
  demo) need+=(binutils python3) ;;
  bench) need+=(udpcast uftp curl python3) ;;
  *) echo "ensure-deps.sh: test|demo|bench" >&2; exit 2 ;;
esac
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
