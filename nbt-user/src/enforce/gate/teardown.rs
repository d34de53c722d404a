//! Tears down connections whose request the balance could not pay.
//!
//! The kernel drops such a request and every later payload of its connection, and puts the
//! connection on a ring buffer (`nbt-ebpf/src/gate/request.rs`). Dropping alone would leave the
//! client retransmitting into the void for minutes; a thread here waits on the ring and
//! destroys each socket through sock_diag, so the client sees ECONNABORTED at once.
//!
//! Where the kernel cannot destroy sockets (no CONFIG_INET_DIAG_DESTROY), or nbt is gone, the
//! connection still sends nothing with payload; its client waits for TCP's own timeout.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use aya::maps::{MapData, RingBuf};
use aya::Ebpf;
use nbt_common::gate::{Teardown, GATE_TEARDOWN_MAP};

use super::log::{destination_text, ip, TornDown};
use crate::sys::sock_diag::{self, SockDiag, TcpSocket};

/// How often the thread looks at its stop flag while the ring is quiet.
const POLL_MS: i32 = 50;

/// The thread that tears connections down, until the run ends.
pub struct Teardowns {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<TornDown>>,
}

/// How nbt tears refused connections down on this kernel, or why it cannot.
pub fn path() -> Result<&'static str, String> {
    sock_diag::probe().map(|()| "sock_diag SOCK_DESTROY")
}

impl Teardowns {
    pub fn start(ebpf: &mut Ebpf) -> Result<Teardowns> {
        let map = ebpf
            .take_map(GATE_TEARDOWN_MAP)
            .ok_or_else(|| anyhow!("{GATE_TEARDOWN_MAP} missing"))?;
        let ring = RingBuf::try_from(map)?;
        let diag = match SockDiag::open() {
            Ok(diag) => Some(diag),
            Err(e) => {
                eprintln!(
                    "nbt: cannot open sock_diag ({e}): connections refused by the gate send \
                     nothing more, but their clients wait for TCP's timeout"
                );
                None
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("nbt-teardown".into())
            .spawn({
                let stop = stop.clone();
                move || serve(ring, diag, &stop)
            })?;
        Ok(Teardowns {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread, after it took what the ring held; what it tore down.
    pub fn finish(mut self) -> TornDown {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Teardowns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut ring: RingBuf<MapData>, diag: Option<SockDiag>, stop: &AtomicBool) -> TornDown {
    let mut torn_down = TornDown::new();
    let mut done: HashSet<u64> = HashSet::new();
    let mut warned = false;
    loop {
        let mut pending = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Teardown>() {
                // SAFETY: the kernel wrote a Teardown, a plain #[repr(C)] value.
                pending.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Teardown>()) });
            }
        }
        for event in pending {
            if !done.insert(event.cookie) {
                continue;
            }
            let socket = TcpSocket {
                local: (
                    ip(event.family, event.src),
                    u16::from_be_bytes(event.ports[0]),
                ),
                remote: (
                    ip(event.family, event.dst),
                    u16::from_be_bytes(event.ports[1]),
                ),
                cookie: event.cookie,
            };
            let result = match &diag {
                Some(diag) => diag.destroy(&socket),
                None => Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            };
            match result {
                Ok(()) => {
                    *torn_down
                        .entry(destination_text(socket.remote.0, socket.remote.1))
                        .or_default() += 1;
                }
                // Gone already (closed by its owner): nothing to tear down.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    // Tried again when its next packet is dropped.
                    done.remove(&event.cookie);
                    if !warned {
                        warned = true;
                        eprintln!(
                            "nbt: cannot tear down a connection the gate refused ({e}); it sends \
                             nothing more, but its client waits for TCP's timeout"
                        );
                    }
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            return torn_down;
        }
        let mut poll = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor we own, for a bounded time.
        unsafe { libc::poll(&mut poll, 1, POLL_MS) };
    }
}
