#!/usr/bin/env bash
# The rackcast demo: an appliance and a simulated rack in network
# namespaces. `rackcast serve` runs in rc-app; every device rc-d1..rc-dN
# runs `rackcast-agent run` with a hardware description (two hardware
# profiles: "Dell PowerEdge R650" with BIOS settings applied through its
# BMC over Redfish (a sushy-tools emulator in each R650's namespace),
# configuration and boot programs, and a generic box) and disk files. The
# agents trust only the appliance's bundle-signing key. Every device walks
# its steps on its own (inventory, generated bundle, BIOS, programs),
# then the images go out concurrently: one wave per image (two OSes, a
# subset of devices gets the second), sharing the appliance's rate.
# Prints a live device table, then devices, waves, one device's full log,
# and checks every disk byte for byte against its image.
#
#   sudo netlab/demo.sh [--devices 8] [--rate 500mbit] [--mib 512] [--loss 1]
#
# Installs missing Debian packages itself. Removes its namespaces,
# processes and files when it ends. Lab addresses 198.18.0.0/24, groups
# 239.255.50.0/24.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=8 RATE=500mbit MIB=512 LOSS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) N=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 2; }
[ "$N" -ge 2 ] && [ "$N" -le 40 ] || { echo "demo.sh: --devices 2..40" >&2; exit 2; }
"$HERE/ensure-deps.sh" demo
command -v cargo >/dev/null || { echo "demo.sh: needs a Rust toolchain (cargo)" >&2; exit 2; }

P=rc-
WORK=/dev/shm/rcdemo.$$
. "$HERE/common.sh"
lab_cleanup_on_exit "$N"
mkdir -p "$WORK/state"

echo "== building (release)"
(cd "$ROOT" && cargo build --release --workspace -q)
BIN="$ROOT/target/release"
RATE_M=$(( $(rate_bps "$RATE") / 1000000 ))
strip -o "$WORK/rackcast-agent" "$BIN/rackcast-agent"

echo "== lab: ${P}app + ${P}d1..${P}d$N, $RATE on the appliance, $LOSS % loss toward ${P}d2"
"$HERE/lab.sh" up "$P" "$N" --rate "$RATE" --loss "2=$LOSS"

# Real OS images, not random bytes: ext4 file systems holding this Debian
# machine's files (its installed packages), mostly compressible, with the
# free space as zero blocks. The appliance compresses their blocks at its
# first start.
echo "== images: debian ($MIB MiB ext4), rocky ($((MIB / 2)) MiB ext4), from this machine's Debian files"
"$HERE/mk-os-image.sh" "$WORK/debian.img" --size-mib "$MIB" --parts "etc usr/sbin usr/share/doc usr/share/locale"
"$HERE/mk-os-image.sh" "$WORK/rocky.img" --size-mib $((MIB / 2)) --parts "etc usr/sbin usr/share/perl usr/share/doc"

mac() { printf '02:de:00:00:00:%02x' "$1"; }
cat >"$WORK/rackcast.toml" <<EOF
[appliance]
control_listen = "198.18.0.1:7100"
api_listen = "198.18.0.1:7180"
operator_listen = "198.18.0.1:7443"
state_dir = "$WORK/state"

[dataplane]
iface = "srv0"
bind = "198.18.0.1"
# 80 % of the link: bundles and feedback need room beside the waves.
total_rate = "$((RATE_M * 4 / 5))M"
group_base = "239.255.50.1"

[enroll]
# The simulated rack is declared (rack.csv, written below); anything else
# that network-boots is held after its inventory for \`rackcast approve\`.
inventory = "$WORK/rack.csv"

[waves]
min_members = 2
start_after = "5s"

[agents]
x86_64 = "$WORK/rackcast-agent"

[[images]]
name = "debian"
path = "$WORK/debian.img"

[[images]]
name = "rocky"
path = "$WORK/rocky.img"

[[profiles]]
name = "r650"
vendor = "Dell*"
model = "PowerEdge R650"
image = "debian"
target = { order = "largest", count = 1 }
bios = { attributes = { BootMode = "Uefi", ProcTurboMode = "Disabled", EmbeddedSata = "Ahci" }, redfish = { url = "http://198.18.1.1:8000", username = "demo", password_file = "$WORK/bmc-password", settle_timeout = "30s" } }
programs = [ { name = "set-hostname", argv = ["sh", "-c", "echo hostname \$RC_DEVICE"] } ]
post_install = [ { name = "check-target", argv = ["sh", "-c", "test -s \$RC_IMAGE_TARGET && echo image on \$RC_IMAGE_TARGET"] } ]
boot_to_disk = { name = "efibootmgr", argv = ["true"] }

[[profiles]]
name = "generic"
image = "rocky"
target = { order = "smallest", count = 1 }

[[devices]]
mac = "$(mac 3)"
image = "rocky"
EOF
echo "mac,serial,hostname,rack,slot" >"$WORK/rack.csv"
for i in $(seq 1 "$N"); do
  echo "$(mac "$i"),SN$i,node$i,demo,$i" >>"$WORK/rack.csv"
done
big=$(( MIB * 3 / 2 )); small=$MIB
for i in $(seq 1 "$N"); do
  if [ $((i % 2)) = 1 ]; then vendor="Dell Inc."; model="PowerEdge R650"; else vendor="Supermicro"; model="SYS-1029U"; fi
  truncate -s "${big}M" "$WORK/d$i-sda.img"
  truncate -s "${small}M" "$WORK/d$i-sdb.img"
  cat >"$WORK/d$i.json" <<EOF
{"dmi": {"vendor": "$vendor", "model": "$model", "serial": "SN$i"},
 "cpu": {"arch": "x86_64", "count": 32}, "memory_bytes": 137438953472,
 "nics": [{"name": "d0", "mac": "$(mac "$i")", "pci_id": "8086:1521"}],
 "disks": [{"name": "sda", "path": "$WORK/d$i-sda.img", "size_bytes": $((big << 20)), "model": "SSD-960", "serial": "A$i"},
           {"name": "sdb", "path": "$WORK/d$i-sdb.img", "size_bytes": $((small << 20)), "model": "SSD-480", "serial": "B$i"}]}
EOF
done

echo "== BMCs: a Redfish emulator in each R650's namespace (198.18.1.1:8000, like a Host Interface)"
SUSHY="$ROOT/target/sushy-venv/bin"
printf 'demo-bmc-%s\n' "$$" >"$WORK/bmc-password"
"$SUSHY/python" -c "import bcrypt,sys; print('demo:' + bcrypt.hashpw(open(sys.argv[1]).read().strip().encode(), bcrypt.gensalt(rounds=4)).decode())" \
  "$WORK/bmc-password" >"$WORK/bmc.htpasswd"
for i in $(seq 1 2 "$N"); do
  ip -n "${P}d$i" addr add 198.18.1.1/32 dev lo
  cat >"$WORK/bmc$i.conf" <<EOF
SUSHY_EMULATOR_LISTEN_IP = '198.18.1.1'
SUSHY_EMULATOR_LISTEN_PORT = 8000
SUSHY_EMULATOR_LIBVIRT_URI = 'test:///default'
SUSHY_EMULATOR_AUTH_FILE = '$WORK/bmc.htpasswd'
SUSHY_EMULATOR_STATE_DIR = '$WORK/bmc$i-state'
EOF
  ip netns exec "${P}d$i" "$SUSHY/sushy-emulator" --config "$WORK/bmc$i.conf" >"$WORK/bmc$i.log" 2>&1 &
  PIDS+=($!)
done
for i in $(seq 1 2 "$N"); do
  for _ in $(seq 1 100); do grep -q "Running on" "$WORK/bmc$i.log" && break; sleep 0.2; done
done

echo "== appliance: rackcast serve (in ${P}app)"
ip netns exec "${P}app" "$BIN/rackcast" serve --config "$WORK/rackcast.toml" --log warn >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
cli() { ip netns exec "${P}app" "$BIN/rackcast" "$@" --config "$WORK/rackcast.toml"; }
# The operator API takes bearer tokens over HTTPS (the appliance's own
# certificate, pinned): a viewer token to watch it.
TOKEN=$(cli token create demo-viewer --role viewer 2>/dev/null)
for _ in $(seq 1 100); do
  ip netns exec "${P}app" curl -sf -m 1 --cacert "$WORK/state/operator-cert.pem" \
    -H "Authorization: Bearer $TOKEN" https://198.18.0.1:7443/api/images >/dev/null 2>&1 && break
  sleep 0.1
done
KEY=$(cli key)
echo "== devices power on: rackcast-agent run in each device namespace (trusting key ${KEY:0:16}...)"
t0=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  ip netns exec "${P}d$i" "$BIN/rackcast-agent" run --server 198.18.0.1:7100 --iface d0 --trust-key "$KEY" \
    --hardware "$WORK/d$i.json" --work-dir "$WORK/work$i" --os-present false --log warn \
    >"$WORK/agent$i.log" 2>&1 &
  PIDS+=($!)
done

deadline=$(( $(date +%s) + 600 ))
while :; do
  sleep 2
  done_n=$(cli devices --json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin) if d["state"] in ("done",)))')
  failed_n=$(cli devices --json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin) if d["state"] == "failed"))')
  printf '\n-- %s: %s of %s devices done, %s failed\n' "$(date +%T)" "$done_n" "$N" "$failed_n"
  cli devices | cut -c1-130
  [ "$done_n" = "$N" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || { echo "demo.sh: not done after 600 s; serve log:" >&2; tail -n 30 "$WORK/serve.log" >&2; exit 1; }
done
t1=$(date +%s.%N)

echo
echo "== waves"
cli waves
echo
echo "== log of device 1 ($(mac 1))"
cli log "$(mac 1)"
echo
echo "== BIOS of device 1 as its BMC reports it now"
sys=$(ip netns exec "${P}d1" curl -s -u "demo:$(cat "$WORK/bmc-password")" http://198.18.1.1:8000/redfish/v1/Systems \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Members"][0]["@odata.id"])')
ip netns exec "${P}d1" curl -s -u "demo:$(cat "$WORK/bmc-password")" "http://198.18.1.1:8000$sys/BIOS" \
  | python3 -c 'import json,sys; a=json.load(sys.stdin)["Attributes"]; print("  " + ", ".join(k + "=" + str(a[k]) for k in ("BootMode", "ProcTurboMode", "EmbeddedSata")))'
echo
echo "== checking every disk against its image"
bad=0
for i in $(seq 1 "$N"); do
  img=$(cli devices --json | python3 -c "import json,sys; print([d['image'] for d in json.load(sys.stdin) if d['mac']=='$(mac "$i")'][0])")
  if [ $((i % 2)) = 1 ]; then disk="$WORK/d$i-sda.img"; else disk="$WORK/d$i-sdb.img"; fi
  size=$(stat -c %s "$WORK/$img.img")
  if cmp -s -n "$size" "$WORK/$img.img" "$disk"; then
    echo "device $i: $img on $(basename "$disk") verified"
  else
    echo "device $i: $img on $(basename "$disk") DIFFERS"; bad=$((bad + 1))
  fi
done
awk -v a="$t0" -v b="$t1" -v n="$N" 'BEGIN { printf "\n%d devices installed in %.1f s (power-on to done)\n", n, b - a }'
[ "$bad" = 0 ]
