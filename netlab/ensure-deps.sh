#!/usr/bin/env bash
# Installs the Debian packages a netlab job needs, only if missing.
#   ensure-deps.sh test|demo|bench
set -euo pipefail
# iputils-ping: the lab learns neighbour entries the way a rack does
# (lab.sh). util-linux: blkid, which the agent's disk check runs (and the loader
# initrd carries); e2fsprogs: mkfs.ext4 for the disk-safety tests.
# fdisk (sfdisk) and mtools: the identity step writes the cloud-init
# seed with them, and rc-mkimage --gpt gives test images a GPT.
need=(iproute2 iputils-ping nftables time procps curl binutils python3 util-linux e2fsprogs fdisk mtools)
case "${1:-test}" in
  # PXE end to end: QEMU (software emulation), Debian's iPXE ROMs and
  # binaries, OVMF for UEFI, a kernel and cpio/kmod for the loader initrd.
  test) need+=(prometheus busybox-static isc-dhcp-client dnsmasq-base tftp-hpa atftp
               qemu-system-x86 ipxe-qemu ipxe ovmf linux-image-amd64 cpio kmod
               python3-libvirt python3-venv mdadm zstd
               # The QEMU test's installed OS: a GPT disk legacy BIOS
               # boots with syslinux, built without mounting.
               syslinux syslinux-common dosfstools
               # Power control: Debian's ipmitool against OpenIPMI's
               # BMC simulator (ipmi_sim).
               ipmitool openipmi
               # The live view: rackcast watch under tmux, the web page in
               # Chromium driven by chromedriver.
               tmux chromium chromium-driver
               # The packages: dpkg -i runs adduser in postinst;
               # systemd-analyze verifies the unit.
               adduser systemd
               # The shared fleet record: each store test starts a
               # private PostgreSQL server of its own (tests/common/pg.rs);
               # keepalived moves an active/standby pair's address.
               postgresql keepalived)
        # qemu-img (qcow2 image sources): machines of this kind have a
        # newer one than Debian 12's qemu-utils; install only if missing.
        command -v qemu-img >/dev/null || need+=(qemu-utils) ;;
  demo) need+=(binutils python3 python3-libvirt python3-venv e2fsprogs ipmitool) ;;
  bench) need+=(udpcast uftp curl python3 e2fsprogs zstd) ;;
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

# The Redfish emulator the BIOS tests talk to: sushy-tools from PyPI in a
# venv that sees Debian's python3-libvirt (its libvirt driver over the
# in-process test:///default hypervisor has BIOS support, no daemon).
if [ "${1:-test}" = test ] || [ "${1:-test}" = demo ]; then
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/sushy-venv"
  if [ ! -x "$venv/bin/sushy-emulator" ]; then
    echo "installing sushy-tools into $venv" >&2
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check sushy-tools==2.2.0
  fi
fi

# cargo-deb builds the appliance's and the agent's .deb (tests/package.rs);
# pinned, so the packages do not change with a new cargo-deb release.
if [ "${1:-test}" = test ] && ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.8\.0'; then
  echo "installing cargo-deb 3.8.0 (crates.io)" >&2
  cargo install -q --locked cargo-deb --version 3.8.0
fi
