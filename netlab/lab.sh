#!/usr/bin/env bash
# Namespace lab: one switch namespace with a bridge, one appliance
# namespace and N device namespaces, each joined to the bridge by a veth.
# Nothing touches the root namespace. Addresses only in 198.18.0.0/15,
# multicast only in 239.255.0.0/16 (enforced by the callers' arguments).
#
#   lab.sh up   PREFIX N [--rate RATE] [--loss DEV=PCT ...] [--slow DEV=RATE ...] [--pin-neigh]
#   lab.sh down PREFIX N
#   lab.sh loss PREFIX DEV PCT      # set/replace random loss toward device DEV
#   lab.sh portloss PREFIX SW PORT PCT  # the same toward any switch port:
#                                   # SW is sw or x-sw2 (`segment`), PORT
#                                   # e.g. vx-rt (the router, on sw) or ve1
#   lab.sh stats PREFIX             # nft counters (dropped packets)
#   lab.sh host PREFIX NAME ADDR [IFACE]  # one more host on the switch
#                                   # (a database, a standby appliance;
#                                   # its interface IFACE, default h0)
#   lab.sh segment PREFIX N         # a second L2 segment behind a router:
#                                   # relay host x-rly (198.18.2.1, iface
#                                   # r0), devices x-e1..x-eN (198.18.2.(10+i),
#                                   # iface e0); router x-rt (198.18.0.254 /
#                                   # 198.18.2.254) routes unicast only (no
#                                   # multicast routing); the appliance gets
#                                   # a route to 198.18.2.0/24 through it
#
# Names: ${PREFIX}sw (switch), ${PREFIX}app (appliance, iface srv0,
# 198.18.0.1/24), ${PREFIX}d1..dN (devices, iface d0, 198.18.0.(10+i)/24).
# Rate: tbf on srv0 (the appliance's egress). Loss: nftables bridge rule
# in the switch namespace (this kernel has no netem), applied toward the
# device only. Slow: a tbf on the device's switch port (a slow port, NIC
# or disk), what does not fit its 50 ms queue is dropped.
set -euo pipefail

cmd=${1:?usage: lab.sh up|down|loss|stats PREFIX ...}
P=${2:?prefix}

ipn() { ip -n "$1" "${@:2}"; }

dev_ip() { echo "198.18.0.$((10 + $1))"; }

lab_down() {
  local n=$1 h
  for i in $(seq 1 "$n"); do ip netns del "${P}d$i" 2>/dev/null || true; done
  # Extra hosts (`lab.sh host`): ${P}x-NAME.
  for h in $(ip netns list | awk -v p="${P}x-" 'index($1, p) == 1 { print $1 }'); do
    ip netns del "$h" 2>/dev/null || true
  done
  ip netns del "${P}app" 2>/dev/null || true
  ip netns del "${P}sw" 2>/dev/null || true
}

host_setup() {
  local ns=$1 ifc=$2 addr=$3
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.disable_ipv6=1
  ipn "$ns" link set lo up
  ipn "$ns" addr add "$addr/24" dev "$ifc"
  ipn "$ns" link set "$ifc" up
  # Without this multicast sends fail with "network unreachable".
  ipn "$ns" route add 224.0.0.0/4 dev "$ifc"
}

# A switch namespace NS with bridge br0 (no STP, no snooping). A switch
# does not run the host firewall on bridged frames: with br_netfilter
# loaded, every forwarded packet would also pass the iptables hooks and
# cost lab CPU that no real rack pays.
switch_setup() {
  local ns=$1 k
  ip netns add "$ns"
  ipn "$ns" link set lo up
  ipn "$ns" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
  ipn "$ns" link set br0 up
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  for k in iptables ip6tables arptables; do
    ip netns exec "$ns" sysctl -qw "net.bridge.bridge-nf-call-$k=0" 2>/dev/null || true
  done
}

set_loss() {
  set_port_loss "${P}sw" "vd$1" "$2"
}

# Random loss toward switch port PORT of switch namespace SW.
set_port_loss() {
  local sw=$1 port=$2 pct=$3
  local per10k
  per10k=$(awk -v p="$pct" 'BEGIN { printf "%d", p * 100 + 0.5 }')
  ip netns exec "$sw" nft list table bridge lab >/dev/null 2>&1 || \
    ip netns exec "$sw" nft add table bridge lab
  ip netns exec "$sw" nft list chain bridge lab lossfwd >/dev/null 2>&1 || \
    ip netns exec "$sw" nft add chain bridge lab lossfwd '{ type filter hook forward priority 0; policy accept; }'
  # Replace any earlier rule for this port.
  local h
  for h in $(ip netns exec "$sw" nft -a list chain bridge lab lossfwd | awk -v d="\"$port\"" '$0 ~ "oifname " d { print $NF }'); do
    ip netns exec "$sw" nft delete rule bridge lab lossfwd handle "$h"
  done
  if [ "$per10k" -gt 0 ]; then
    ip netns exec "$sw" nft add rule bridge lab lossfwd oifname "$port" numgen random mod 10000 '<' "$per10k" counter drop
  fi
}

case "$cmd" in
  up)
    N=${3:?N}; shift 3
    rate="" losses=() slows=() pin=0
    while [ $# -gt 0 ]; do
      case "$1" in
        --rate) rate=$2; shift 2 ;;
        --loss) losses+=("$2"); shift 2 ;;
        --slow) slows+=("$2"); shift 2 ;;
        --pin-neigh) pin=1; shift ;;
        *) echo "lab.sh: unknown option $1" >&2; exit 2 ;;
      esac
    done
    [ "$N" -ge 1 ] && [ "$N" -le 200 ] || { echo "lab.sh: N must be 1..200" >&2; exit 2; }
    lab_down "$N"
    switch_setup "${P}sw"
    ip netns add "${P}app"
    ipn "${P}app" link add srv0 type veth peer name vs0 netns "${P}sw"
    ipn "${P}sw" link set vs0 master br0 up
    host_setup "${P}app" srv0 198.18.0.1
    for i in $(seq 1 "$N"); do
      ip netns add "${P}d$i"
      ipn "${P}d$i" link add d0 type veth peer name "vd$i" netns "${P}sw"
      ipn "${P}sw" link set "vd$i" master br0 up
      host_setup "${P}d$i" d0 "$(dev_ip "$i")"
    done
    # Neighbour entries: by default the kernel's own ARP, learnt the way a
    # rack learns them (a device that network-booted from the appliance
    # has talked to it: one ping each, before any loss rule), then aging
    # and re-resolved by the kernel across the lossy link like any other.
    # --pin-neigh pins them (`nud permanent`), which hides what resolving
    # them costs.
    if [ "$pin" = 0 ]; then
      pids=()
      for i in $(seq 1 "$N"); do
        ip netns exec "${P}d$i" ping -q -c 2 -i 0.2 -W 1 198.18.0.1 >/dev/null 2>&1 &
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p" || true; done
    else
      app_mac=$(ip netns exec "${P}app" cat /sys/class/net/srv0/address)
      for i in $(seq 1 "$N"); do
        mac=$(ip netns exec "${P}d$i" cat /sys/class/net/d0/address)
        ipn "${P}app" neigh replace "$(dev_ip "$i")" lladdr "$mac" dev srv0 nud permanent
        ipn "${P}d$i" neigh replace 198.18.0.1 lladdr "$app_mac" dev d0 nud permanent
      done
    fi
    if [ -n "$rate" ]; then
      ip netns exec "${P}app" tc qdisc replace dev srv0 root tbf rate "$rate" burst 256kb latency 100ms
    fi
    for l in "${losses[@]+"${losses[@]}"}"; do
      set_loss "${l%%=*}" "${l#*=}"
    done
    for l in "${slows[@]+"${slows[@]}"}"; do
      ip netns exec "${P}sw" tc qdisc replace dev "vd${l%%=*}" root tbf rate "${l#*=}" burst 64kb latency 50ms
    done
    ;;
  down)
    lab_down "${3:?N}"
    ;;
  loss)
    set_loss "${3:?dev}" "${4:?pct}"
    ;;
  portloss)
    set_port_loss "${P}${3:?sw}" "${4:?port}" "${5:?pct}"
    ;;
  stats)
    ip netns exec "${P}sw" nft list table bridge lab 2>/dev/null || true
    ;;
  host)
    name=${3:?name} addr=${4:?addr} ifc=${5:-h0}
    case "$addr" in 198.18.*|198.19.*) ;; *) echo "lab.sh: $addr is outside 198.18.0.0/15" >&2; exit 2 ;; esac
    ns="${P}x-$name"
    ip netns add "$ns"
    ipn "$ns" link add "$ifc" type veth peer name "vx-$name" netns "${P}sw"
    ipn "${P}sw" link set "vx-$name" master br0 up
    host_setup "$ns" "$ifc" "$addr"
    ;;
  segment)
    N=${3:?N}
    [ "$N" -ge 1 ] && [ "$N" -le 200 ] || { echo "lab.sh: N must be 1..200" >&2; exit 2; }
    sw="${P}x-sw2" rt="${P}x-rt"
    switch_setup "$sw"
    # The router: one leg on each segment; it forwards unicast and, with
    # no multicast routing, no group traffic crosses it.
    ip netns add "$rt"
    ipn "$rt" link add ra type veth peer name vx-rt netns "${P}sw"
    ipn "${P}sw" link set vx-rt master br0 up
    ipn "$rt" link add rb type veth peer name vr-b netns "$sw"
    ipn "$sw" link set vr-b master br0 up
    host_setup "$rt" ra 198.18.0.254
    ipn "$rt" addr add 198.18.2.254/24 dev rb
    ipn "$rt" link set rb up
    ip netns exec "$rt" sysctl -qw net.ipv4.ip_forward=1
    ipn "${P}app" route add 198.18.2.0/24 via 198.18.0.254
    seg_host() {
      local ns=$1 ifc=$2 port=$3 addr=$4
      ip netns add "$ns"
      ipn "$ns" link add "$ifc" type veth peer name "$port" netns "$sw"
      ipn "$sw" link set "$port" master br0 up
      host_setup "$ns" "$ifc" "$addr"
      ipn "$ns" route add 198.18.0.0/24 via 198.18.2.254
    }
    seg_host "${P}x-rly" r0 vr-rly 198.18.2.1
    for i in $(seq 1 "$N"); do
      seg_host "${P}x-e$i" e0 "ve$i" "198.18.2.$((10 + i))"
    done
    ;;
  *)
    echo "lab.sh: unknown command $cmd" >&2; exit 2 ;;
esac
