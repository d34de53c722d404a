//! Workloads for nbt's integration tests. Each mode does one thing a test measures.
//!
//!   alloc MIB                 allocate MIB MiB and write every page, then exit 0
//!   alloc-hold MIB MS         allocate MIB MiB as alloc does, hold them MS milliseconds, then exit 0
//!   spin SECONDS [THREADS]    burn CPU in one thread (or THREADS) for SECONDS of wall time
//!   forkbomb SECONDS          every process forks as fast as it can until SECONDS have passed
//!   tcp-send ADDR BYTES       connect to ADDR, send BYTES, half-close, read until EOF; print
//!                             the kernel's count of payload bytes sent, retransmissions included
//!   tcp-stream ADDR SECONDS [CC [FROM TO]]  connect to ADDR and send as fast as the socket
//!                             takes it for SECONDS; with CC, first switch the socket's congestion
//!                             control to CC (TCP_CONGESTION; exit 3 when refused, as EPERM for an
//!                             algorithm not in tcp_allowed_congestion_control without
//!                             CAP_NET_ADMIN) and print the algorithm in use, the segment size and
//!                             the payload bytes retransmitted, in all and (with FROM and TO)
//!                             between FROM and TO seconds after the connection
//!   stream-and-ping BULK ECHO SECONDS  tcp-stream to BULK and, beside it, a 64-byte request
//!                             every 10 ms to the echo server ECHO; prints the round trips'
//!                             p50 and p99 in ms (the queueing delay a bulk flow causes),
//!                             its count, its segments sent and how long it ran
//!   tcp-recv ADDR FROM TO     accept one connection on ADDR, read it to the end, print the
//!                             payload rate between FROM and TO seconds after the first byte
//!   tcp-sink ADDR FROM TO     as tcp-recv, with the rate the least-squares slope over every read
//!                             in the window (FROM and TO may be fractions of a second), and the
//!                             socket's window clamp and rcv_ssthresh at the end; with UNTIL
//!                             (a 4th argument), it stops reading UNTIL seconds after the accept
//!                             and resets the connection, rather than wait for the sender's
//!                             queued bytes to drain at a slow rate
//!   udp-send ADDR COUNT SIZE  send COUNT datagrams of SIZE bytes to ADDR, numbered from 0
//!   udp-blast ADDR SECONDS SIZE BITS  send SIZE-byte datagrams to ADDR for SECONDS, paced at BITS
//!                             IP bits/s (SIZE + 28 bytes each; 0: as fast as it can); prints the
//!                             datagrams tried, those refused, and the offered IP rate
//!   udp-sink ADDR FROM TO     receive on ADDR until a second passes quietly after the first
//!                             datagram; prints the payload bytes, the rate (slope) between FROM
//!                             and TO seconds after the first datagram and the socket's drops
//!   await-signal FILE         write our pid to FILE, wait for a signal, write its name, exit 42
//!   sleep SECONDS             sleep
//!   sleepers N SECONDS [MS]   fork N children that each spin MS of CPU, then wake once a
//!                             second for a few microseconds until SECONDS have passed
//!
//! The gate's bypass modes each try one way out and print `<mode> ok` or `<mode> <errno name>`:
//!   connect ADDR              a TCP connect (ADDR may be [v6]:port, also ::ffff:a.b.c.d)
//!   connect-loop ADDR N MS    N connects, MS apart
//!   connect-time ADDR N       N connects one after another; prints each one's time in ms
//!   listen ADDR SECONDS       accept connections on ADDR (and close them) for SECONDS
//!   udp-sendto ADDR           one datagram with sendto(2)
//!   udp-sendmsg ADDR          one datagram with sendmsg(2)
//!   thread-connect ADDR       a connect from a second thread
//!   child-connect ADDR        a connect from a forked child (which execs nbt-testbin again)
//!   udp-paced ADDR N PPS      N datagrams of 64 bytes at PPS per second (below any rate limit)
//!   udp-count ADDR SECONDS    count the datagrams arriving on ADDR until SECONDS pass quietly,
//!                             and those that overtook a lower-numbered one
//!   udp-tally ADDR COUNT SECONDS  receive udp-send's numbered datagrams (COUNT of them) on ADDR
//!                             until SECONDS pass quietly; print how many arrived once, twice,
//!                             more often, never, and damaged (a bad number or fill)
//!   raw-send IPV4             one UDP datagram built by hand on a raw socket (IP_HDRINCL)
//!   keepalive ADDR A B MS     connect, send A bytes, wait MS, send B bytes, half-close
//!
//! `escape` tries each way out of a run a workload has, printing `<way> ok` or `<way> <errno>`:
//! its pid into each hierarchy's root `cgroup.procs`, a read of `$NBT_TEST_SECRET`, a file made
//! in `$NBT_TEST_PRIVATE_DIR`, listing nbt's pins, and the BPF objects of the kernel by id.

#[path = "../rate.rs"]
mod rate;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| {
        eprintln!("nbt-testbin: missing argument {i}");
        std::process::exit(2)
    })
}

fn num(args: &[String], i: usize) -> u64 {
    arg(args, i).parse().unwrap_or_else(|_| {
        eprintln!("nbt-testbin: argument {i} is not a number");
        std::process::exit(2)
    })
}

/// Argument `i` as a number of seconds, fractions allowed.
fn seconds(args: &[String], i: usize) -> f64 {
    arg(args, i).parse().unwrap_or_else(|_| {
        eprintln!("nbt-testbin: argument {i} is not a number of seconds");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // NBT_TESTBIN_DELAY_MS: wait before doing anything (for a state the run reaches after start).
    if let Some(ms) = std::env::var("NBT_TESTBIN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    // NBT_TESTBIN_WAIT_FILE: wait until that file exists (a process started before nbt attached
    // to it, told to go once it has).
    if let Some(file) = std::env::var_os("NBT_TESTBIN_WAIT_FILE") {
        while !std::path::Path::new(&file).exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    match arg(&args, 1) {
        "alloc" => drop(alloc(num(&args, 2))),
        "alloc-hold" => {
            let held = alloc(num(&args, 2));
            std::thread::sleep(Duration::from_millis(num(&args, 3)));
            drop(held);
        }
        "spin" => {
            let threads = args.get(3).map_or(1, |_| num(&args, 3));
            let duration = Duration::from_secs(num(&args, 2));
            let others: Vec<_> = (1..threads)
                .map(|_| std::thread::spawn(move || spin(duration)))
                .collect();
            spin(duration);
            others.into_iter().for_each(|t| t.join().unwrap());
        }
        "pingpong" => pingpong(num(&args, 2)),
        "sleepers" => sleepers(
            num(&args, 2),
            Duration::from_secs(num(&args, 3)),
            Duration::from_millis(args.get(4).map_or(0, |_| num(&args, 4))),
        ),
        "short-lived" => short_lived(num(&args, 2), Duration::from_millis(num(&args, 3))),
        "forkbomb" => forkbomb(Instant::now() + Duration::from_secs(num(&args, 2))),
        "tcp-send" => tcp_send(arg(&args, 2), num(&args, 3)),
        "tcp-stream" => tcp_stream(
            arg(&args, 2),
            Duration::from_secs(num(&args, 3)),
            args.get(4).map(String::as_str),
            args.get(5).map(|_| (seconds(&args, 5), seconds(&args, 6))),
        ),
        "tcp-sink" => tcp_sink(
            arg(&args, 2),
            seconds(&args, 3),
            seconds(&args, 4),
            args.get(5).map(|_| seconds(&args, 5)),
        ),
        "stream-and-ping" => stream_and_ping(
            arg(&args, 2),
            arg(&args, 3),
            Duration::from_secs(num(&args, 4)),
        ),
        "tcp-recv" => tcp_recv(arg(&args, 2), num(&args, 3) as f64, num(&args, 4) as f64),
        "udp-send" => udp_send(arg(&args, 2), num(&args, 3), num(&args, 4)),
        "udp-blast" => udp_blast(
            arg(&args, 2),
            Duration::from_secs(num(&args, 3)),
            num(&args, 4),
            num(&args, 5),
        ),
        "udp-sink" => udp_sink(arg(&args, 2), seconds(&args, 3), seconds(&args, 4)),
        "udp-paced" => udp_paced(arg(&args, 2), num(&args, 3), num(&args, 4)),
        "udp-count" => udp_count(arg(&args, 2), num(&args, 3)),
        "udp-tally" => udp_tally(arg(&args, 2), num(&args, 3), num(&args, 4)),
        "await-signal" => await_signal(arg(&args, 2)),
        "sleep" => std::thread::sleep(Duration::from_secs(num(&args, 2))),
        "connect" => println!("connect {}", outcome(connect(arg(&args, 2)))),
        "connect-loop" => {
            for _ in 0..num(&args, 3) {
                println!("connect {}", outcome(connect(arg(&args, 2))));
                std::thread::sleep(Duration::from_millis(num(&args, 4)));
            }
        }
        "listen" => {
            let listener = std::net::TcpListener::bind(arg(&args, 2)).expect("bind");
            let end = Instant::now() + Duration::from_secs(num(&args, 3));
            listener.set_nonblocking(true).expect("nonblocking");
            while Instant::now() < end {
                match listener.accept() {
                    Ok((stream, _)) => drop(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        "connect-time" => {
            let times: Vec<String> = (0..num(&args, 3))
                .map(|_| {
                    let start = Instant::now();
                    let _ = connect(arg(&args, 2)).expect("connect");
                    format!("{:.2}", start.elapsed().as_secs_f64() * 1e3)
                })
                .collect();
            println!("connect_ms {}", times.join(" "));
        }
        "udp-sendto" => println!("udp-sendto {}", outcome(udp_sendto(arg(&args, 2)))),
        "udp-sendmsg" => println!("udp-sendmsg {}", outcome(udp_sendmsg(arg(&args, 2)))),
        "thread-connect" => {
            let addr = arg(&args, 2).to_string();
            let result = std::thread::spawn(move || outcome(connect(&addr)))
                .join()
                .unwrap();
            println!("thread-connect {result}");
        }
        "child-connect" => {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["connect", arg(&args, 2)])
                .output()
                .expect("child");
            print!("child-{}", String::from_utf8_lossy(&output.stdout));
        }
        "raw-send" => println!("raw-send {}", outcome(raw_send(arg(&args, 2)))),
        "keepalive" => keepalive(arg(&args, 2), num(&args, 3), num(&args, 4), num(&args, 5)),
        "requests" => requests(arg(&args, 2), num(&args, 3)),
        "reply-server" => reply_server(arg(&args, 2), Duration::from_secs(num(&args, 3))),
        "escape" => escape(),
        other => {
            eprintln!("nbt-testbin: unknown mode {other}");
            std::process::exit(2)
        }
    }
}

fn outcome<T>(result: std::io::Result<T>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ENOBUFS) => "ENOBUFS".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            _ => format!("error {e}"),
        },
    }
}

fn socket_addr(addr: &str) -> std::net::SocketAddr {
    addr.parse().unwrap_or_else(|_| {
        eprintln!("nbt-testbin: '{addr}' is not ip:port or [ip6]:port");
        std::process::exit(2)
    })
}

fn connect(addr: &str) -> std::io::Result<std::net::TcpStream> {
    std::net::TcpStream::connect_timeout(&socket_addr(addr), Duration::from_secs(3))
}

fn udp_socket_for(addr: &std::net::SocketAddr) -> std::net::UdpSocket {
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    std::net::UdpSocket::bind(local).expect("bind")
}

fn udp_sendto(addr: &str) -> std::io::Result<usize> {
    let addr = socket_addr(addr);
    udp_socket_for(&addr).send_to(b"datagram", addr)
}

fn udp_sendmsg(addr: &str) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let addr = socket_addr(addr);
    let socket = udp_socket_for(&addr);
    let std::net::SocketAddr::V4(v4) = addr else {
        eprintln!("nbt-testbin: udp-sendmsg takes an IPv4 address");
        std::process::exit(2)
    };
    // SAFETY: sendmsg(2) with a msghdr pointing at locals that outlive the call.
    unsafe {
        let mut name: libc::sockaddr_in = std::mem::zeroed();
        name.sin_family = libc::AF_INET as libc::sa_family_t;
        name.sin_port = v4.port().to_be();
        name.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        let mut payload = *b"datagram";
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        match libc::sendmsg(socket.as_raw_fd(), &msg, 0) {
            -1 => Err(std::io::Error::last_os_error()),
            n => Ok(n as usize),
        }
    }
}

/// A UDP datagram to port 9 (discard) of `ip`, IP header and all, on a raw socket: nothing of
/// the UDP stack (and so no sendmsg hook) sees it; only cgroup egress does.
fn raw_send(ip: &str) -> std::io::Result<usize> {
    let dst: std::net::Ipv4Addr = ip.parse().expect("an IPv4 address");
    // SAFETY: socket(2) and sendto(2) on a buffer and address that outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        const LEN: usize = 20 + 8 + 8;
        let mut packet = [0u8; LEN];
        packet[0] = 0x45; // IPv4, 5 words of header
        packet[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
        packet[8] = 64; // TTL
        packet[9] = libc::IPPROTO_UDP as u8;
        packet[16..20].copy_from_slice(&dst.octets());
        packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
        packet[22..24].copy_from_slice(&9u16.to_be_bytes());
        packet[24..26].copy_from_slice(&16u16.to_be_bytes());
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let result = if sent < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        };
        libc::close(fd);
        result
    }
}

fn keepalive(addr: &str, first: u64, second: u64, gap_ms: u64) {
    let mut stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            println!("keepalive connect {}", outcome::<()>(Err(e)));
            return;
        }
    };
    let first_result = stream.write_all(&vec![1u8; first as usize]);
    println!("keepalive first {}", outcome(first_result));
    std::thread::sleep(Duration::from_millis(gap_ms));
    let second_result = stream.write_all(&vec![2u8; second as usize]);
    println!("keepalive second {}", outcome(second_result));
    // Give TCP time to try: what the gate drops never arrives.
    std::thread::sleep(Duration::from_millis(gap_ms));
}

/// `requests ADDR N`: N request lines over one connection, each waiting for its reply line;
/// prints "request i ok" or "request i ERRNO MS ms" (how long the failure took), then stops.
fn requests(addr: &str, count: u64) {
    use std::io::BufRead;
    let stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            println!("request connect {}", outcome::<()>(Err(e)));
            return;
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    for i in 0..count {
        let start = Instant::now();
        let mut reply = String::new();
        let result = (&stream)
            .write_all(format!("request {i}\n").as_bytes())
            .and_then(|()| reader.read_line(&mut reply))
            .and_then(|n| match n {
                0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                _ => Ok(()),
            });
        match result {
            Ok(()) => println!("request {i} ok"),
            Err(e) => {
                let name = match e.raw_os_error() {
                    Some(libc::ECONNABORTED) => "ECONNABORTED".to_string(),
                    Some(libc::ECONNRESET) => "ECONNRESET".to_string(),
                    _ => format!("error {e}"),
                };
                println!(
                    "request {i} {name} {:.1} ms",
                    start.elapsed().as_secs_f64() * 1000.0
                );
                return;
            }
        }
    }
}

/// `reply-server ADDR SECONDS`: prints "listening" once bound, answers each line of each
/// connection with one line, and prints "served N", the request lines received so far, after
/// each (a caller may stop it as soon as its client is done) and at the end.
fn reply_server(addr: &str, duration: Duration) {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    println!("listening");
    let served = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    while Instant::now() < end {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                let served = served.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    for line in std::io::BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        println!("served {}", served.fetch_add(1, Ordering::Relaxed) + 1);
                        if writer
                            .write_all(format!("reply to {line}\n").as_bytes())
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    println!("served {}", served.load(Ordering::Relaxed));
}

/// Allocates and touches `mib` MiB; returns them, so that the caller decides how long they are
/// held.
fn alloc(mib: u64) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    for _ in 0..mib {
        // A page-by-page write, so the memory is really committed and charged.
        let mut chunk = vec![0u8; 1 << 20];
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        chunks.push(chunk);
    }
    println!("allocated {} MiB", chunks.len());
    chunks
}

fn spin(duration: Duration) {
    let end = Instant::now() + duration;
    let mut x = 0u64;
    while Instant::now() < end {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    println!("{}", x & 1);
}

/// Two processes pass a byte back and forth over two pipes `rounds` times: every round is two
/// wake-ups and two context switches. Prints the time per round.
fn pingpong(rounds: u64) {
    let (mut ping, mut pong) = ([0i32; 2], [0i32; 2]);
    // SAFETY: pipe writes two descriptors into the arrays we own.
    unsafe {
        assert_eq!(libc::pipe(ping.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(pong.as_mut_ptr()), 0);
    }
    let mut byte = [0u8; 1];
    // SAFETY: the child only reads and writes its pipes and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        for _ in 0..rounds {
            // SAFETY: one byte read into and written from `byte`, a one-byte buffer we own, on
            // the pipes' open descriptors.
            unsafe {
                libc::read(ping[0], byte.as_mut_ptr().cast(), 1);
                libc::write(pong[1], byte.as_ptr().cast(), 1);
            }
        }
        // SAFETY: _exit(2) ends the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    let start = Instant::now();
    for _ in 0..rounds {
        // SAFETY: one byte written from and read into `byte`, a one-byte buffer we own, on the
        // pipes' open descriptors.
        unsafe {
            libc::write(ping[1], byte.as_ptr().cast(), 1);
            libc::read(pong[0], byte.as_mut_ptr().cast(), 1);
        }
    }
    let elapsed = start.elapsed();
    // SAFETY: waitpid(2) on our own child; a null status pointer is allowed.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    println!(
        "pingpong rounds {rounds} ns_per_round {:.1}",
        elapsed.as_nanos() as f64 / rounds as f64
    );
}

/// `count` processes that each wake every second for a moment, for `duration`.
fn sleepers(count: u64, duration: Duration, warm_up: Duration) {
    let end = Instant::now() + duration;
    let mut children = Vec::new();
    for _ in 0..count {
        // SAFETY: the child only spins, sleeps and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // First a stretch of CPU (longer than the agent's 10.1 ms sampling period, so each
            // child is seen), then a few microseconds a second.
            let mut x = 0u64;
            while process_cpu_time() < warm_up {
                for i in 0..1000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                }
            }
            std::hint::black_box(x);
            while Instant::now() < end {
                std::hint::black_box((0..10_000u64).sum::<u64>());
                std::thread::sleep(Duration::from_secs(1));
            }
            // SAFETY: _exit(2) ends the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        children.push(pid);
    }
    println!("sleepers {count}");
    for pid in children {
        // SAFETY: waitpid(2) on our own child; a null status pointer is allowed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}

/// Forks `count` children one after another; each spins until it has used `cpu` of CPU time,
/// then exits.
fn short_lived(count: u64, cpu: Duration) {
    for _ in 0..count {
        // SAFETY: the child only spins and calls _exit; no locks are held across the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut x = 0u64;
            while process_cpu_time() < cpu {
                for i in 0..1000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                }
            }
            std::hint::black_box(x);
            // SAFETY: _exit(2) ends the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child, into a status we own.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    println!("forked {count}");
}

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn forkbomb(deadline: Instant) {
    let mut forked = 0u64;
    let mut refused = 0u64;
    let top = std::process::id();
    while Instant::now() < deadline {
        // SAFETY: the child only loops, forks and exits; it touches no locks held by other threads
        // (there are none in this single-threaded program).
        match unsafe { libc::fork() } {
            0 => {
                // A child: keep going until the deadline, then leave.
                continue;
            }
            -1 => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => forked += 1,
        }
    }
    if std::process::id() == top {
        println!("forked {forked} refused {refused}");
    }
    // SAFETY: _exit skips atexit handlers and stdio flushing, which children must not run twice.
    unsafe { libc::_exit(0) };
}

fn tcp_send(addr: &str, bytes: u64) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let block = vec![7u8; 64 * 1024];
    let mut left = bytes as usize;
    while left > 0 {
        let n = left.min(block.len());
        stream.write_all(&block[..n]).expect("write");
        left -= n;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("read");
    let info = tcp_info(&stream);
    println!(
        "sent {bytes} payload_bytes_sent {} retransmitted {}",
        info.tcpi_bytes_sent, info.tcpi_bytes_retrans
    );
}

/// The kernel's `struct tcp_info` of a TCP socket (glibc's part of it).
fn tcp_info(stream: &std::net::TcpStream) -> libc::tcp_info {
    // SAFETY: getsockopt(TCP_INFO) into a zeroed tcp_info of the size we pass.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO");
        info
    }
}

/// Switches the socket's congestion control to `name` (TCP_CONGESTION); exits 3 when refused.
/// Done after connect and before any payload: the handshake does not depend on it.
fn set_congestion(stream: &std::net::TcpStream, name: &str) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    // SAFETY: setsockopt with a pointer to `name`'s bytes and their length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        eprintln!(
            "nbt-testbin: TCP_CONGESTION {name}: {}",
            errno(Err::<(), _>(err))
        );
        std::process::exit(3);
    }
}

/// The congestion control the socket uses (TCP_CONGESTION read back).
fn congestion(stream: &std::net::TcpStream) -> String {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_CONGESTION");
    let name = &name[..(len as usize).min(name.len())];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn tcp_stream(
    addr: &str,
    duration: Duration,
    congestion_control: Option<&str>,
    window: Option<(f64, f64)>,
) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    if let Some(name) = congestion_control {
        set_congestion(&stream, name);
    }
    // The bytes retransmitted between FROM and TO, read from the kernel at those times.
    let began = Instant::now();
    let in_window = window.map(|(from, to)| {
        let stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            let retransmitted_at = |at: f64| {
                let due = began + Duration::from_secs_f64(at);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                tcp_info(&stream).tcpi_bytes_retrans
            };
            let first = retransmitted_at(from);
            retransmitted_at(to) - first
        })
    });
    let block = vec![7u8; 16 * 1024];
    let end = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < end {
        stream.write_all(&block).expect("write");
        sent += block.len() as u64;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    if congestion_control.is_none() {
        println!("sent {sent}");
        return;
    }
    let info = tcp_info(&stream);
    print!(
        "sent {sent} cc {} mss {} retransmitted {}",
        congestion(&stream),
        info.tcpi_snd_mss,
        info.tcpi_bytes_retrans
    );
    match in_window.map(|t| t.join().expect("window")) {
        Some(bytes) => println!(" retransmitted_in_window {bytes}"),
        None => println!(),
    }
}

fn stream_and_ping(bulk: &str, echo: &str, duration: Duration) {
    let bulk = bulk.to_string();
    let sender = std::thread::spawn(move || tcp_stream(&bulk, duration, None, None));
    std::thread::sleep(Duration::from_millis(500));
    let mut stream = std::net::TcpStream::connect(echo).expect("connect echo");
    stream.set_nodelay(true).expect("nodelay");
    let began = Instant::now();
    let end = began + duration - Duration::from_millis(1000);
    let mut rtts = Vec::new();
    let (request, mut reply) = ([5u8; 64], [0u8; 64]);
    while Instant::now() < end {
        let start = Instant::now();
        if stream.write_all(&request).is_err() || stream.read_exact(&mut reply).is_err() {
            break;
        }
        rtts.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every segment the request/response flow sent, pure ACKs included: they share the limit.
    let segments = segments_sent(&stream);
    let ping_seconds = began.elapsed().as_secs_f64();
    sender.join().expect("bulk sender");
    rtts.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "rtt_ms_p50 {:.3} rtt_ms_p99 {:.3} samples {} segments {segments} ping_seconds {ping_seconds:.3}",
        at(0.5),
        at(0.99),
        rtts.len()
    );
}

/// `tcpi_segs_out` of a TCP socket (data and pure ACKs), read from the kernel's `struct
/// tcp_info` at its fixed offset (136 bytes, since Linux 4.2; glibc's copy of the struct ends
/// before it).
fn segments_sent(stream: &std::net::TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    const SEGS_OUT: usize = 136;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert!(rc == 0 && len as usize >= SEGS_OUT + 4, "TCP_INFO");
    u32::from_ne_bytes(info[SEGS_OUT..SEGS_OUT + 4].try_into().unwrap())
}

fn tcp_recv(addr: &str, from: f64, to: f64) {
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    println!("listening");
    let (mut stream, _) = listener.accept().expect("accept");
    let mut buffer = vec![0u8; 1 << 20];
    let (mut total, mut start, mut at_from, mut at_to) = (0u64, None, None, None);
    loop {
        let n = stream.read(&mut buffer).expect("read");
        if n == 0 {
            break;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(*start.get_or_insert(now)).as_secs_f64();
        if elapsed >= from && at_from.is_none() {
            at_from = Some((elapsed, total));
        }
        total += n as u64;
        if elapsed >= to && at_to.is_none() {
            at_to = Some((elapsed, total));
        }
    }
    match (at_from, at_to) {
        (Some((t0, b0)), Some((t1, b1))) => {
            println!(
                "received {total} rate_bits_per_sec {:.0}",
                (b1 - b0) as f64 * 8.0 / (t1 - t0)
            )
        }
        _ => println!("received {total} too short for the window"),
    }
}

fn tcp_sink(addr: &str, from: f64, to: f64, until: Option<f64>) {
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    println!("listening");
    let (stream, _) = listener.accept().expect("accept");
    let kept = stream.try_clone().expect("clone");
    if let Some(until) = until {
        let reading = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(until));
            // The read below then sees the end of the stream; the close at exit resets it.
            let _ = reading.shutdown(std::net::Shutdown::Read);
        });
    }
    // A reset ends the count as the end of the stream does.
    let (marks, _) = rate::read_marks(stream);
    let total = marks.last().map_or(0, |m| m.1);
    // The bound on the window the receiver advertised at the end, and how far it had grown.
    let mut clamp = 0i32;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt(TCP_WINDOW_CLAMP) into a local int of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&kept),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&mut clamp as *mut i32).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_WINDOW_CLAMP");
    println!(
        "received {total} rate_bits_per_sec {:.0} reads {} window_clamp {clamp} rcv_ssthresh {}",
        rate::slope_bits_per_sec(&marks, from, to),
        marks.len(),
        tcp_info(&kept).tcpi_rcv_ssthresh
    );
}

/// Sets an integer socket option; false when refused.
fn set_int_option(fd: i32, level: i32, name: i32, value: i32) -> bool {
    // SAFETY: setsockopt with a pointer to a local int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        ) == 0
    }
}

fn udp_blast(addr: &str, duration: Duration, size: u64, bits_per_sec: u64) {
    let addr = socket_addr(addr);
    let socket = udp_socket_for(&addr);
    let payload = vec![1u8; size as usize];
    let wire_bits = ((size + 28) * 8) as f64;
    let start = Instant::now();
    let (mut tried, mut refused) = (0u64, 0u64);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        if bits_per_sec > 0 {
            // The next datagram is due when the ones before it have had their time at the pace.
            let due = Duration::from_secs_f64(tried as f64 * wire_bits / bits_per_sec as f64);
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(5)));
                continue;
            }
        }
        // Refused (EPERM or ENOBUFS) when a shaper drops it on the way out: counted as offered.
        if socket.send_to(&payload, addr).is_err() {
            refused += 1;
        }
        tried += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "tried {tried} refused {refused} size {size} seconds {seconds:.3} offered_bits_per_sec {:.0}",
        tried as f64 * wire_bits / seconds
    );
}

fn udp_sink(addr: &str, from: f64, to: f64) {
    use std::os::fd::AsRawFd;
    // Linux's numbers for SO_RCVBUFFORCE and SO_MEMINFO (asm-generic/socket.h), which this libc
    // does not export for every target.
    const SO_RCVBUFFORCE: i32 = 33;
    const SO_MEMINFO: i32 = 55;
    let socket = std::net::UdpSocket::bind(addr).expect("bind");
    let fd = socket.as_raw_fd();
    // A deep buffer so that the reader's scheduling does not drop datagrams: past rmem_max when
    // we may (CAP_NET_ADMIN), else as deep as rmem_max lets us.
    if !set_int_option(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20) {
        set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 16 << 20);
    }
    println!("listening");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buffer = vec![0u8; 1 << 16];
    let (mut total, mut datagrams, mut start, mut marks) = (0u64, 0u64, None, Vec::new());
    while let Ok(n) = socket.recv(&mut buffer) {
        let now = Instant::now();
        if start.is_none() {
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
        }
        total += n as u64;
        datagrams += 1;
        marks.push((
            now.duration_since(*start.get_or_insert(now)).as_secs_f64(),
            total,
        ));
    }
    let mut meminfo = [0u32; 16];
    let mut len = size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: the buffer and its length are valid; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let drops = if rc == 0 {
        meminfo[libc::SK_MEMINFO_DROPS as usize].to_string()
    } else {
        "unknown".into()
    };
    println!(
        "received {total} datagrams {datagrams} rate_bits_per_sec {:.0} socket_drops {drops}",
        rate::slope_bits_per_sec(&marks, from, to)
    );
}

fn udp_send(addr: &str, count: u64, size: u64) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    // Each datagram carries its sequence number, so a receiver can tell which were lost.
    let mut payload = vec![1u8; (size as usize).max(8)];
    // A datagram the shaper drops at egress fails with ENOBUFS: counted, not fatal. The sender
    // pauses now and then so that the receiver's socket buffer never overflows.
    let mut refused = 0u64;
    for i in 0..count {
        payload[..8].copy_from_slice(&i.to_le_bytes());
        if socket.send_to(&payload, addr).is_err() {
            refused += 1;
        }
        if i % 200 == 199 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    println!("sent {count} refused {refused}");
}

fn udp_paced(addr: &str, count: u64, per_second: u64) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    let start = Instant::now();
    let mut refused = 0u64;
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / per_second.max(1) as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let mut payload = [0u8; 64];
        payload[..8].copy_from_slice(&i.to_le_bytes());
        if socket.send_to(&payload, addr).is_err() {
            refused += 1;
        }
    }
    println!("sent {count} refused {refused}");
}

fn udp_count(addr: &str, quiet_seconds: u64) {
    let socket = std::net::UdpSocket::bind(addr).expect("bind");
    println!("listening");
    let mut received = 0u64;
    let mut buffer = [0u8; 2048];
    // Datagrams numbered from 0 (udp-paced, udp-send), in the order they came: those that came
    // before one numbered lower (a reorder overtakes the packets delayed before it; a lost one
    // overtakes nothing).
    let mut order = Vec::<u64>::new();
    // The first datagram may take a while; after it, SECONDS without one ends the count.
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    while let Ok(n) = socket.recv(&mut buffer) {
        received += 1;
        if n >= 8 {
            order.push(u64::from_le_bytes(buffer[..8].try_into().unwrap()));
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(quiet_seconds.max(1))))
            .expect("timeout");
    }
    let (mut lowest_after, mut overtaking) = (u64::MAX, 0u64);
    for seq in order.iter().rev() {
        if *seq > lowest_after {
            overtaking += 1;
        }
        lowest_after = lowest_after.min(*seq);
    }
    println!("received {received} overtaking {overtaking}");
}

fn udp_tally(addr: &str, count: u64, quiet_seconds: u64) {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(addr).expect("bind");
    // 64 MiB of receive buffer where allowed (SO_RCVBUFFORCE: a workload run as root): a
    // receiver kept off its CPU by a busy machine must not lose datagrams, or what is counted
    // is not the impairment's.
    let bytes: libc::c_int = 64 << 20;
    // SAFETY: setsockopt with a pointer to a local int and its size; a refusal changes nothing.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let mut times = vec![0u32; count as usize];
    let mut damaged = 0u64;
    let mut buffer = [0u8; 2048];
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    while let Ok(n) = socket.recv(&mut buffer) {
        let seq = if n >= 8 {
            u64::from_le_bytes(buffer[..8].try_into().unwrap())
        } else {
            u64::MAX
        };
        // udp-send's datagrams: the number, then ones.
        if seq >= count || buffer[8..n].iter().any(|b| *b != 1) {
            damaged += 1;
        } else {
            times[seq as usize] += 1;
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(quiet_seconds.max(1))))
            .expect("timeout");
    }
    let tally = |f: &dyn Fn(u32) -> bool| times.iter().filter(|t| f(**t)).count();
    println!(
        "once {} twice {} more {} missing {} damaged {damaged}",
        tally(&|t| t == 1),
        tally(&|t| t == 2),
        tally(&|t| t > 2),
        tally(&|t| t == 0),
    );
}

static mut RECEIVED: i32 = 0;

extern "C" fn record(signal: i32) {
    // SAFETY: a single word written from a signal handler, read after the handler ran.
    unsafe { RECEIVED = signal };
}

fn await_signal(file: &str) {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: installing a handler that only stores the signal number.
        unsafe { libc::signal(signal, record as *const () as usize) };
    }
    std::fs::write(file, std::process::id().to_string()).expect("write pid");
    loop {
        // SAFETY: pause(2) returns after a handled signal.
        unsafe { libc::pause() };
        // SAFETY: read of the word the handler stored.
        let signal = unsafe { RECEIVED };
        if signal != 0 {
            let name = match signal {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "SIGUSR1",
            };
            std::fs::write(file, name).expect("write signal");
            std::process::exit(42);
        }
    }
}

fn escape() {
    // Pure v2: /sys/fs/cgroup is the root. Hybrid: each v1 hierarchy and `unified` below it.
    let mut roots = vec![std::path::PathBuf::from("/sys/fs/cgroup/cgroup.procs")];
    for entry in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        roots.push(entry.path().join("cgroup.procs"));
    }
    roots.retain(|procs| procs.exists());
    for procs in roots {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()));
        println!("cgroup {} {}", procs.display(), errno(written));
    }
    let secret = std::env::var("NBT_TEST_SECRET").unwrap_or_default();
    println!("read-key {}", errno(std::fs::read(secret)));
    let private = std::env::var("NBT_TEST_PRIVATE_DIR").unwrap_or_default();
    let made = std::path::Path::new(&private).join("planted");
    println!("write-state {}", errno(std::fs::write(made, "x")));
    println!("list-pins {}", errno(std::fs::read_dir("/sys/fs/bpf/nbt")));
    // BPF_MAP_GET_NEXT_ID (12) and BPF_PROG_GET_NEXT_ID (11): walking the kernel's BPF objects.
    for (way, cmd) in [("bpf-maps", 12), ("bpf-progs", 11)] {
        let mut attr = [0u32; 4];
        // SAFETY: bpf(2) with a zeroed attribute union of the size given.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 16) };
        let result = if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        };
        println!("{way} {}", errno(result));
    }
}

/// `ok`, or the error's name for the ways out: EACCES, EPERM, ...
fn errno<T>(result: std::io::Result<T>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EACCES) => "EACCES".into(),
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ENOENT) => "ENOENT".into(),
            _ => format!("error {e}"),
        },
    }
}
