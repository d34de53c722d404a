//! Workloads for nbt's integration tests. Each mode does one thing a test measures.
//!
//!   alloc MIB                 allocate MIB MiB and write every page, then exit 0
//!   spin SECONDS              burn CPU in one thread for SECONDS of wall time
//!   forkbomb SECONDS          every process forks as fast as it can until SECONDS have passed
//!   tcp-send ADDR BYTES       connect to ADDR, send BYTES, half-close, read until EOF; print
//!                             the kernel's count of payload bytes sent, retransmissions included
//!   tcp-stream ADDR SECONDS   connect to ADDR and send as fast as the socket takes it for SECONDS
//!   tcp-recv ADDR FROM TO     accept one connection on ADDR, read it to the end, print the
//!                             payload rate between FROM and TO seconds after the first byte
//!   udp-send ADDR COUNT SIZE  send COUNT datagrams of SIZE bytes to ADDR, numbered from 0
//!   await-signal FILE         write our pid to FILE, wait for a signal, write its name, exit 42
//!   sleep SECONDS             sleep

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, 1) {
        "alloc" => alloc(num(&args, 2)),
        "spin" => spin(Duration::from_secs(num(&args, 2))),
        "forkbomb" => forkbomb(Instant::now() + Duration::from_secs(num(&args, 2))),
        "tcp-send" => tcp_send(arg(&args, 2), num(&args, 3)),
        "tcp-stream" => tcp_stream(arg(&args, 2), Duration::from_secs(num(&args, 3))),
        "tcp-recv" => tcp_recv(arg(&args, 2), num(&args, 3) as f64, num(&args, 4) as f64),
        "udp-send" => udp_send(arg(&args, 2), num(&args, 3), num(&args, 4)),
        "await-signal" => await_signal(arg(&args, 2)),
        "sleep" => std::thread::sleep(Duration::from_secs(num(&args, 2))),
        other => {
            eprintln!("nbt-testbin: unknown mode {other}");
            std::process::exit(2)
        }
    }
}

fn alloc(mib: u64) {
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
    // SAFETY: getsockopt(TCP_INFO) into a zeroed tcp_info of the size we pass.
    let info = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO");
        info
    };
    println!(
        "sent {bytes} payload_bytes_sent {} retransmitted {}",
        info.tcpi_bytes_sent, info.tcpi_bytes_retrans
    );
}

fn tcp_stream(addr: &str, duration: Duration) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
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
    println!("sent {sent}");
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
