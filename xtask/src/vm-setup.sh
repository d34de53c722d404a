#!/bin/busybox sh
# The start of every init of nbt's VMs (vm-init.sh, vm-bench.sh follow it in one file): busybox,
# proc/sys/dev, bpffs, pure cgroup v2 with its controllers, and two namespaces `a` (192.0.2.1)
# and `b` (192.0.2.2) joined by the veth pair va/vb.
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin
# Module autoloading (qdiscs, cls_bpf) goes through /sbin/modprobe, as on a real system.
mkdir -p /sbin && ln -s /bin/modprobe /sbin/modprobe
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs run /run; mount -t tmpfs tmp /tmp
mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
# cgroup2 off /sys, so that `ip netns exec` (which remounts /sys) keeps it.
mkdir -p /cg && mount -t cgroup2 none /cg
echo "+memory +cpu +pids" > /cg/cgroup.subtree_control
modprobe veth
IP=/usr/local/bin/ip; TC=/usr/local/bin/tc
$IP netns add a; $IP netns add b
$IP link add va netns a type veth peer name vb netns b
$IP -n a addr add 192.0.2.1/24 dev va; $IP -n b addr add 192.0.2.2/24 dev vb
for ns in a b; do $IP -n $ns link set lo up; done
$IP -n a link set va up; $IP -n b link set vb up
echo "NBT-VM-KERNEL $(uname -r) cgroup2: $(cat /cg/cgroup.controllers)"

in_a() { $IP netns exec a "$@"; }
in_b() { $IP netns exec b "$@"; }
# A TCP counter of namespace a's /proc/net/snmp by name ($1: RetransSegs, OutSegs...).
tcp_counter() { in_a awk -v want=$1 '/^Tcp:/ { if (n++) { for (i = 1; i <= NF; i++) if (h[i] == want) print $i } else for (i = 1; i <= NF; i++) h[i] = $i }' /proc/net/snmp; }
