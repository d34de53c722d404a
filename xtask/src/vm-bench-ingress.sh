# The init of `cargo xtask bench vm-ingress`: TCP into a run, limited on arrival, three ways, on
# the veth pair (sender in b, receiver in a): htb on an ifb device (the usual tc way to shape what
# arrives: the interface's ingress qdisc redirects every packet to the ifb), nbt's policer
# (`--ingress-rate`), and nbt's queue (`--ingress-rate --ingress-queue`). Prints
# `NBT-VM-INGRESS <method> <cc> <rate> <goodput bits/s> <sender retransmitted segments>` lines,
# then NBT-VM-DONE. The VM has fq, which this host lacks, so the queue runs here only.
export NBT_USER=65534:65534
SECONDS_ON=20
modprobe ifb; modprobe sch_htb; modprobe sch_fq; modprobe act_mirred; modprobe cls_matchall
modprobe sch_ingress; modprobe tcp_bbr
$IP -n a link add ifb0 type ifb && $IP -n a link set ifb0 up

# Until port 5001 listens in namespace a (a run starts in 1 to 3 s under emulation).
listening() { for i in $(seq 50); do in_a grep -q ":1389 00000000:0000 0A" /proc/net/tcp && return 0; sleep 0.2; done; return 1; }
# $1: method, $2: congestion control, $3: rate (bits/s), $4...: how to run the receiver.
cell() {
    local method=$1 cc=$2 limit=$3
    shift 3
    before=$(in_b awk '/^Tcp:/ { if (n++) print $13 }' /proc/net/snmp)
    { "$@" nbt-testbin tcp-sink 192.0.2.1:5001 3 $((SECONDS_ON - 1)) > /tmp/sink 2>/tmp/sink.err & }
    listening
    in_b nbt-testbin tcp-stream 192.0.2.1:5001 $SECONDS_ON "$cc" > /tmp/stream 2>&1
    wait
    after=$(in_b awk '/^Tcp:/ { if (n++) print $13 }' /proc/net/snmp)
    got=$(awk '/^received/ { print $4 }' /tmp/sink)
    echo "NBT-VM-INGRESS $method $cc $limit ${got:--} $((after - before))"
    [ -n "$got" ] || echo "NBT-VM-INGRESS-ERROR $method: $(tail -c 300 /tmp/sink.err | tr '\n' ' ') sender: $(tail -c 200 /tmp/stream | tr '\n' ' ')"
}
for rate in 512kbit 10mbit 100mbit; do
    bits=$(echo $rate | sed 's/kbit/000/;s/mbit/000000/')
    for cc in bbr cubic; do
        $TC -n a qdisc add dev va handle ffff: ingress
        $TC -n a filter add dev va parent ffff: matchall action mirred egress redirect dev ifb0
        $TC -n a qdisc add dev ifb0 root handle 1: htb default 1
        $TC -n a class add dev ifb0 parent 1: classid 1:1 htb rate $bits ceil $bits
        cell htb-ifb $cc $bits in_a
        $TC -n a qdisc del dev ifb0 root; $TC -n a qdisc del dev va ingress
        cell nbt $cc $bits in_a nbt run --ingress-rate $rate --
        cell nbt-queue $cc $bits in_a nbt run --ingress-rate $rate --ingress-queue --
    done
done
echo NBT-VM-DONE
poweroff -f
