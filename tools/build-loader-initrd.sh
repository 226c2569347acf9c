#!/usr/bin/env bash
# Build the rackcast loader initrd from Debian packages: busybox (static,
# package busybox-static) for a shell, udhcpc and the usual tools, mdadm
# (the agent's software RAID backend), plus rackcast-agent and the shared
# libraries they link. Its /init brings up
# the network with udhcpc, reads rackcast.server= from the kernel command
# line (the per-device iPXE script puts it there) and runs
# `rackcast-agent run` in loader mode; on exit it drops to a shell on the
# console instead of panicking the kernel.
#
#   tools/build-loader-initrd.sh OUT_DIR [AGENT_BINARY]
#
# Writes OUT_DIR/initrd.img (gzip'd newc cpio) and, if this machine has a
# Debian kernel image, OUT_DIR/vmlinuz (else install linux-image-amd64 or
# copy one in). Point `[boot.http] files` at OUT_DIR.
#
# The iPXE binaries the DHCP service names come from Debian too:
# package ipxe -> /usr/lib/ipxe/undionly.kpxe (legacy BIOS) and
# /usr/lib/ipxe/ipxe.efi (x86-64 UEFI); copy them into `[boot.tftp] root`.
# ipxe-qemu has the ROMs QEMU uses for `-boot n`.
#
# Kernel modules: the kernel's NIC and disk drivers are modules in Debian,
# so the drivers named in RC_LOADER_MODULES (default below: virtio, the
# common Intel/Broadcom NICs, AHCI/NVMe/SCSI disks) and everything they
# depend on (`modprobe --show-depends`) are copied in and loaded by /init
# in dependency order; names this kernel lacks are skipped. Firmware files
# are not included: a NIC that needs firmware to come up wants its
# /lib/firmware files added here.
#
# Proven by tests/pxe.rs: a QEMU machine PXE-boots it and its agent
# reports the machine's inventory to the appliance.
set -euo pipefail
OUT=${1:?usage: build-loader-initrd.sh OUT_DIR [AGENT_BINARY]}
HERE=$(cd "$(dirname "$0")" && pwd)
AGENT=${2:-$HERE/../target/release/rackcast-agent}
[ -x "$AGENT" ] || { echo "no agent binary at $AGENT (cargo build --release --workspace)" >&2; exit 2; }
BB=/bin/busybox
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  echo "installing busybox-static" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
fi
case "$(ldd "$BB" 2>&1 || true)" in
  *"not a dynamic executable"*) ;;
  *) echo "$BB is not static (install busybox-static)" >&2; exit 2 ;;
esac
command -v cpio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cpio >/dev/null
# mdadm: the agent's software RAID backend.
[ -x /sbin/mdadm ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mdadm >/dev/null

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
MODULES=${RC_LOADER_MODULES:-virtio_pci virtio_net virtio_blk virtio_scsi e1000 e1000e igb ixgbe i40e bnxt_en tg3 ahci nvme sd_mod md_mod raid0 raid1 raid10 raid456}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,etc,proc,sys,dev,run,tmp,usr/bin,usr/share/udhcpc,var/lib/rackcast}
cp "$BB" "$STAGE/bin/busybox"
for app in $("$BB" --list); do
  [ -e "$STAGE/bin/$app" ] || ln -s busybox "$STAGE/bin/$app"
done
# A program and the shared libraries it links (glibc, libgcc_s, libudev,
# the dynamic loader), each at its own path.
add_program() {
  local src=$1 dest=$2
  mkdir -p "$STAGE$(dirname "$dest")"
  cp "$src" "$STAGE$dest"
  strip "$STAGE$dest" 2>/dev/null || true
  ldd "$src" | awk '/=> \// { print $3 } $1 ~ /^\// { print $1 }' | sort -u | while read -r lib; do
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
  done
}
add_program "$AGENT" /usr/bin/rackcast-agent
add_program /sbin/mdadm /sbin/mdadm
# util-linux's blkid (busybox's has no -p/-o export): the agent refuses a
# target disk holding a filesystem or partition table by what it finds.
add_program /sbin/blkid /sbin/blkid
# The identity step: util-linux's sfdisk finds or adds the CIDATA
# partition, mtools (one program, called by these names) writes the
# cloud-init seed on it without mounting anything.
add_program /sbin/sfdisk /sbin/sfdisk
for t in mformat mcopy mtype; do
  add_program "$(command -v "$t")" "/usr/bin/$t"
done
# mtools converts FAT names through iconv (codepage 850 by default,
# also 437): glibc loads those converters at run time from its gconv
# folder, which ldd does not list. Without them every mformat fails
# ("Error converting to codepage 850").
libc=$(ldd "$(command -v mformat)" | awk '/libc\.so/ { print $3 }')
gconv=$(realpath "$(dirname "$libc")/gconv" 2>/dev/null || true)
if [ -n "$gconv" ] && [ -d "$gconv" ]; then
  mkdir -p "$STAGE$gconv"
  cp "$gconv/gconv-modules" "$gconv/IBM850.so" "$gconv/IBM437.so" "$STAGE$gconv/"
  [ -d "$gconv/gconv-modules.d" ] && cp -r "$gconv/gconv-modules.d" "$STAGE$gconv/"
else
  echo "note: no $gconv: mtools in the initrd cannot convert FAT names" >&2
fi

# Driver modules of the kernel we ship, with their dependencies first.
: >"$STAGE/etc/modules.order"
if [ -n "$kernel" ]; then
  kver=${kernel#/boot/vmlinuz-}
  if command -v modprobe >/dev/null && [ -d "/lib/modules/$kver" ]; then
    for m in $MODULES; do
      modprobe --show-depends -S "$kver" "$m" 2>/dev/null || echo "note: kernel $kver has no module $m (or it is built in)" >&2
    done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
      mkdir -p "$STAGE$(dirname "$ko")"
      cp "$ko" "$STAGE$ko"
      echo "$ko" >>"$STAGE/etc/modules.order"
    done
  else
    echo "note: no modprobe or /lib/modules/$kver: no driver modules in the initrd" >&2
  fi
fi

cat >"$STAGE/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure the interface from the lease.
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
EOF
chmod +x "$STAGE/usr/share/udhcpc/default.script"

cat >"$STAGE/init" <<'EOF'
#!/bin/sh
# rackcast loader: network up, then the agent in loader mode.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mount -t tmpfs tmpfs /run
# Drivers (NIC, disks) in dependency order; a missing device is harmless.
while read -r ko; do
  case "$ko" in *.ko.xz) xz -dc "$ko" >/tmp/m.ko && insmod /tmp/m.ko ;; *) insmod "$ko" ;; esac 2>/dev/null
done </etc/modules.order
ip link set lo up
server=""
for w in $(cat /proc/cmdline); do
  case "$w" in rackcast.server=*) server=${w#rackcast.server=} ;; esac
done
echo "rackcast loader: appliance ${server:-unknown}"
for nic in /sys/class/net/*; do
  n=$(basename "$nic"); [ "$n" = lo ] && continue
  ip link set "$n" up
  udhcpc -i "$n" -n -q -t 5 -T 2 -s /usr/share/udhcpc/default.script && break
done
# Loader mode: reports the inventory, fetches and verifies its bundle,
# then execs the bundle's agent (which reconnects on its own).
/usr/bin/rackcast-agent run ${server:+--server "$server"} --work-dir /run/rackcast --os-present false
echo "rackcast loader: agent exited ($?); shell on the console"
exec /bin/sh
EOF
chmod +x "$STAGE/init"

mkdir -p "$OUT"
(cd "$STAGE" && find . | cpio -o -H newc --quiet | gzip -9) >"$OUT/initrd.img"
if [ -n "$kernel" ]; then cp "$kernel" "$OUT/vmlinuz"; else echo "note: no /boot/vmlinuz-*; put a kernel at $OUT/vmlinuz (apt-get install linux-image-amd64)" >&2; fi
echo "$OUT/initrd.img: $(stat -c %s "$OUT/initrd.img") bytes, $(wc -l <"$STAGE/etc/modules.order") modules"
