# The init of `cargo xtask bench vm-ingress`: TCP into a run, limited on arrival, three ways: htb
# on an ifb device (the usual tc way to shape what arrives: the interface's ingress qdisc
# redirects every packet to the ifb), nbt's policer (`--ingress-rate --ingress-queue=false`), and
# nbt's queue (`--ingress-rate --ingress-queue`, the default here). Paths: the veth pair at MTU 1500 (sender in b, receiver in
# a), the same at MTU 9000, and loopback (both in a; no htb: its ifb would take the sender's
# ACKs too). Prints `NBT-VM-INGRESS <method> <path> <cc> <rate> <goodput bits/s> <sender's
# retransmitted segments> <sender's mss>` lines, then NBT-VM-DONE. The VM has fq, which this host
# lacks, so the queue runs here only.
export NBT_USER=65534:65534
SECONDS_ON=20
modprobe ifb; modprobe sch_htb; modprobe sch_fq; modprobe act_mirred; modprobe cls_matchall
modprobe sch_ingress; modprobe tcp_bbr
$IP -n a link add ifb0 type ifb && $IP -n a link set ifb0 up

# Until port 5001 listens in namespace a (a run starts in 1 to 3 s under emulation).
listening() { for i in $(seq 50); do in_a grep -q ":1389 00000000:0000 0A" /proc/net/tcp && return 0; sleep 0.2; done; return 1; }
# $1: method, $2: path, $3: congestion control, $4: rate (bits/s), $5...: how to run the
# receiver. The sender runs in b (veths) or a (loopback).
cell() {
    local method=$1 path=$2 cc=$3 limit=$4 at=192.0.2.1 sender=in_b
    shift 4
    if [ "$path" = lo ]; then at=127.0.0.1; sender=in_a; fi
    { "$@" nbt-testbin tcp-sink $at:5001 3 $((SECONDS_ON - 1)) > /tmp/sink 2>/tmp/sink.err & }
    listening
    $sender nbt-testbin tcp-stream $at:5001 $SECONDS_ON "$cc" > /tmp/stream 2>&1
    wait
    got=$(awk '/^received/ { print $4 }' /tmp/sink)
    # The sender's retransmitted bytes, in segments of its mss.
    sent=$(awk '/^sent/ { printf "%d %d", $8 / ($6 ? $6 : 1), $6 }' /tmp/stream)
    echo "NBT-VM-INGRESS $method $path $cc $limit ${got:--} ${sent:-- -}"
    [ -n "$got" ] || echo "NBT-VM-INGRESS-ERROR $method: $(tail -c 300 /tmp/sink.err | tr '\n' ' ') sender: $(tail -c 200 /tmp/stream | tr '\n' ' ')"
}
# $1: path, $2: congestion control, $3: rate as nbt takes it; htb beside nbt but on loopback.
cells() {
    local path=$1 cc=$2 rate=$3 bits
    bits=$(echo $rate | sed 's/kbit/000/;s/mbit/000000/')
    if [ "$path" != lo ]; then
        $TC -n a qdisc add dev va handle ffff: ingress
        $TC -n a filter add dev va parent ffff: matchall action mirred egress redirect dev ifb0
        $TC -n a qdisc add dev ifb0 root handle 1: htb default 1
        $TC -n a class add dev ifb0 parent 1: classid 1:1 htb rate $bits ceil $bits
        cell htb-ifb $path $cc $bits in_a
        $TC -n a qdisc del dev ifb0 root; $TC -n a qdisc del dev va ingress
    fi
    cell nbt $path $cc $bits in_a nbt run --ingress-rate $rate --ingress-queue=false --
    cell nbt-queue $path $cc $bits in_a nbt run --ingress-rate $rate --ingress-queue --
}
for rate in 512kbit 10mbit 100mbit; do
    for cc in bbr cubic; do cells veth1500 $cc $rate; done
done
# BBR, the policer's weak case, on the other paths.
$IP -n a link set va mtu 9000; $IP -n b link set vb mtu 9000; $IP -n a link set ifb0 mtu 9000
for rate in 512kbit 10mbit 100mbit; do cells veth9000 bbr $rate; done
$IP -n a link set va mtu 1500; $IP -n b link set vb mtu 1500
for rate in 512kbit 10mbit 100mbit; do cells lo bbr $rate; done
echo NBT-VM-DONE
poweroff -f
