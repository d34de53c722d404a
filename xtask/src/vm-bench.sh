# The init of `cargo xtask bench vm`: the seed's own method (tc htb 512kbit + netem 100ms 5% loss
# on the interface, as nbt_network_limit.sh does) against nbt's `nbt` profile network limits
# (in eBPF on the run's cgroup, fq for the delay), on one veth pair, one after the other.
# Prints `NBT-VM-BENCH <method> <key> <value>...` lines, then NBT-VM-DONE.
# Workloads run as uid 65534, as they would under sudo for a user with no rights (this VM has
# no user database: numeric ids).
export NBT_USER=65534:65534
median() { tr ' ' '\n' | grep -v connect_ms | sort -n | awk '{ v[NR]=$1 } END { printf "%.2f", v[int((NR+1)/2)] }'; }
# Busy CPU time of the whole VM (user+nice+system+irq+softirq), in clock ticks.
busy() { awk '/^cpu / { print $2+$3+$4+$7+$8 }' /proc/stat; }
# CPU seconds per MiB: $1 and $2 busy ticks before and after, $3 bytes received.
per_mib() { echo "$1 $2 $3" | awk '{ printf "%.3f", ($2 - $1) / 100 / ($3 / 1048576) }'; }
RATE=512000
SECONDS_ON=30
LOSS_DATAGRAMS=10000

# The bulk send alone: goodput at the receiver from second 5 to 25, and the CPU the whole VM spent
# meanwhile: over the whole send (for nbt its start and end included), and over seconds 6 to 26
# of it, the steady state, where the cost per MiB is the methods' work per packet and nbt's
# supervision (nbt's workload starts up to a second after nbt does). Sets ratio, cpu, steady,
# bytes and retransmitted. $1...: how to run the sender ("" for the seed: the qdisc does it).
bulk() {
    in_b nbt-testbin tcp-recv 192.0.2.2:5001 5 25 > /tmp/recv &
    sleep 1
    before=$(busy)
    retrans_before=$(tcp_counter RetransSegs)
    in_a "$@" nbt-testbin tcp-stream 192.0.2.2:5001 $SECONDS_ON > /dev/null 2>&1 &
    sleep 6
    steady_before=$(busy)
    sleep 20
    steady_after=$(busy)
    wait
    after=$(busy)
    retransmitted=$(( $(tcp_counter RetransSegs) - retrans_before ))
    rate=$(awk '/rate_bits_per_sec/ { print $4 }' /tmp/recv)
    bytes=$(awk '/received/ { print $2 }' /tmp/recv)
    # Wire bits per goodput bit of a full TCP segment: 1500-byte packets carry 1448 bytes.
    ratio=$(echo "$rate" | awk -v r=$RATE '{ printf "%.3f", $1 / r * 1500 / 1448 }')
    cpu=$(per_mib $before $after $bytes)
    steady=$(per_mib $steady_before $steady_after $bytes)
}

# $1: method name; $2...: how to run a workload under it ("" for the seed: the qdisc does it).
measure() {
    method=$1; shift
    bulk "$@"
    # Loss: 10,000 datagrams of 64 bytes at 400 a second (294 kbit/s of IP, below the rate).
    # A share of 1,000 moved by 0.7 points (one standard deviation at 5%), more than the 0.5
    # the comparison with the seed allows; of 10,000 by 0.22.
    in_b nbt-testbin udp-count 192.0.2.2:5002 3 > /tmp/count &
    sleep 1
    in_a "$@" nbt-testbin udp-paced 192.0.2.2:5002 $LOSS_DATAGRAMS 400 > /dev/null 2>&1
    wait
    got=$(awk '/received/ { print $2 }' /tmp/count)
    loss=$(echo "$got" | awk -v n=$LOSS_DATAGRAMS '{ printf "%.2f", (n - $1) * 100 / n }')
    # Added delay: the median TCP connect time, against the unshaped one.
    in_b nbt-testbin listen 192.0.2.2:5003 30 &
    sleep 1
    delayed=$(in_a "$@" nbt-testbin connect-time 192.0.2.2:5003 21 2>/dev/null | grep connect_ms | median)
    kill $! 2>/dev/null; wait
    added=$(echo "$BASE $delayed" | awk '{ printf "%.1f", $2 - $1 }')
    echo "NBT-VM-BENCH $method rate_ratio $ratio loss_pct $loss added_ms $added cpu_s_per_mib $cpu steady_cpu_s_per_mib $steady received_bytes $bytes retransmitted $retransmitted"
}

in_b nbt-testbin listen 192.0.2.2:5003 30 &
sleep 1
BASE=$(in_a nbt-testbin connect-time 192.0.2.2:5003 21 2>/dev/null | grep connect_ms | median)
kill $! 2>/dev/null; wait
echo "NBT-VM-BENCH base connect_ms $BASE"

# The seed's method, word for word but for the interface.
modprobe sch_htb; modprobe sch_netem
seed_qdiscs() {
    $TC -n a qdisc add dev va root handle 1: htb default 12
    $TC -n a class add dev va parent 1: classid 1:12 htb rate 512kbit ceil 512kbit
    $TC -n a qdisc add dev va parent 1:12 handle 10: netem delay 100ms loss 5%
}
seed_qdiscs
measure tc-htb-netem
$TC -n a qdisc del dev va root

measure nbt nbt run --egress-rate 512kbit --loss 5% --latency 100ms --
# nbt's own cost apart from any traffic: the whole VM's busy CPU during a run of `true` (start and
# end alone) and of `sleep 30` (the same plus 30 s of supervision).
cost() { before=$(busy); in_a nbt run --egress-rate 512kbit --loss 5% --latency 100ms -- "$@" > /dev/null 2>&1; after=$(busy); echo "$before $after" | awk '{ printf "%.2f", ($2 - $1) / 100 }'; }
# The seed's own fixed cost beside it: its qdiscs put on and taken off, as the seed's script does.
seed_cost() {
    before=$(busy)
    seed_qdiscs
    $TC -n a qdisc del dev va root
    after=$(busy)
    echo "$before $after" | awk '{ printf "%.2f", ($2 - $1) / 100 }'
}
echo "NBT-VM-COST true_s $(cost true) sleep30_s $(cost sleep 30) seed_setup_s $(seed_cost)"
# Which of nbt's pieces costs TCP goodput: each of loss and latency alone with the rate.
measure nbt-rate+latency nbt run --egress-rate 512kbit --latency 100ms --
measure nbt-rate+loss nbt run --egress-rate 512kbit --loss 5% --
# netem's other impairments against nbt's, measured at the receiver: 1000 numbered datagrams
# of 64 bytes at 200 a second, each impairment alone; the receiver counts what arrived and what
# overtook a datagram numbered lower.
# $1: method; $2: impairment; $3...: how to run the sender under it ("" for netem).
impair_row() {
    method=$1; what=$2; shift 2
    in_b nbt-testbin udp-count 192.0.2.2:5004 3 > /tmp/count &
    sleep 1
    in_a "$@" nbt-testbin udp-paced 192.0.2.2:5004 1000 200 > /dev/null 2>&1
    wait
    echo "NBT-VM-IMPAIR $what $method $(awk '/received/ { print $2, $4 }' /tmp/count)"
}
# $1: impairment; $2: netem's arguments; $3: nbt's flags.
impair_pair() {
    $TC -n a qdisc add dev va root netem $2
    impair_row netem "$1"
    $TC -n a qdisc del dev va root
    impair_row nbt "$1" nbt run $3 --
}
impair_pair duplicate-10% "duplicate 10%" "--duplicate 10%"
impair_pair corrupt-5% "corrupt 5%" "--corrupt 5%"
impair_pair "reorder-25%,delay-20ms" "delay 20ms reorder 25%" "--latency 20ms --reorder 25%"
impair_pair "loss-20%,correlation-75%" "loss 20% 75%" "--loss 20% --loss-correlation 75%"
# An uploading TCP sender under rate and delay: the seed's htb + netem (netem's default limit
# of 1000 packets) against nbt, goodput from second 4 to 12 of a 13 s upload.
# $1: setting; $2: rate (bits/s); $3: method; $4...: how to run the sender ("" for netem).
upload_row() {
    what=$1; rate=$2; method=$3; shift 3
    in_b nbt-testbin tcp-recv 192.0.2.2:5001 4 12 > /tmp/recv &
    sleep 1
    in_a "$@" nbt-testbin tcp-stream 192.0.2.2:5001 13 > /dev/null 2>&1
    wait
    echo "NBT-VM-UPLOAD $what $method $(awk -v r=$rate '/rate_bits_per_sec/ { printf "%.3f", $4 / r * 1500 / 1448 }' /tmp/recv)"
}
# $1: rate as tc and nbt write it; $2: in bits/s; $3: delay.
upload_pair() {
    $TC -n a qdisc add dev va root handle 1: htb default 12
    $TC -n a class add dev va parent 1: classid 1:12 htb rate $1 ceil $1
    $TC -n a qdisc add dev va parent 1:12 handle 10: netem delay $3
    upload_row "$1+$3" $2 netem
    $TC -n a qdisc del dev va root
    upload_row "$1+$3" $2 nbt nbt run --egress-rate $1 --latency $3 --
}
upload_pair 10mbit 10000000 20ms
upload_pair 100mbit 100000000 50ms
# The steady CPU per MiB of one 20-s bulk send moves by up to 1.8 x from run to run under
# emulation, more than the 1.5 x issue 20 allows nbt against the seed: more rounds of the bulk
# send alone, the seed and nbt's full profile in turn, so that the ratio is read as a median.
for round in 2 3 4 5; do
    seed_qdiscs
    bulk
    $TC -n a qdisc del dev va root
    echo "NBT-VM-STEADY $round tc-htb-netem $steady $ratio"
    bulk nbt run --egress-rate 512kbit --loss 5% --latency 100ms --
    echo "NBT-VM-STEADY $round nbt $steady $ratio"
done
echo NBT-VM-DONE
poweroff -f
