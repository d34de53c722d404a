//! sock_diag's SOCK_DESTROY (netlink): aborts a TCP socket of this network namespace, as
//! `ss -K` does. The socket's owner sees ECONNABORTED on its next call, or at once when it is
//! blocked in one. Needs CAP_NET_ADMIN and a kernel built with CONFIG_INET_DIAG_DESTROY.
//!
//! The request names the socket by its 4-tuple and its cookie: a socket that reused the tuple
//! has another cookie, and the kernel answers ESTALE instead of destroying it.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DESTROY: u16 = 21;
const IPPROTO_TCP: u8 = 6;

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` then `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Default)]
struct DestroyRequest {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// A TCP socket as sock_diag finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub cookie: u64,
}

fn octets(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

/// A netlink socket to sock_diag, kept open for the requests of one run.
pub struct SockDiag {
    fd: OwnedFd,
}

impl SockDiag {
    pub fn open() -> io::Result<SockDiag> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SockDiag { fd })
    }

    /// Destroys `socket`: Ok when it is gone; ENOENT when there is no such socket, ESTALE when
    /// the tuple belongs to another socket, EOPNOTSUPP when the kernel cannot destroy sockets.
    pub fn destroy(&self, socket: &TcpSocket) -> io::Result<()> {
        let family = match socket.remote.0 {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        let request = DestroyRequest {
            len: size_of::<DestroyRequest>() as u32,
            kind: SOCK_DESTROY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            seq: 1,
            family: family as u8,
            protocol: IPPROTO_TCP,
            states: u32::MAX,
            id: SockId {
                sport: socket.local.1.to_be_bytes(),
                dport: socket.remote.1.to_be_bytes(),
                src: octets(socket.local.0),
                dst: octets(socket.remote.0),
                interface: 0,
                cookie: [socket.cookie as u32, (socket.cookie >> 32) as u32],
            },
            ..DestroyRequest::default()
        };
        // SAFETY: sends the bytes of a plain #[repr(C)] value of ours, padding-free.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                (&raw const request).cast(),
                size_of::<DestroyRequest>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        self.ack()
    }

    /// Reads the kernel's NLMSG_ERROR answer: error 0 is success.
    fn ack(&self) -> io::Result<()> {
        let mut answer = [0u8; 256];
        // SAFETY: recv(2) into a buffer of ours, of the length given.
        let got = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                answer.as_mut_ptr().cast(),
                answer.len(),
                0,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        // nlmsghdr (16 bytes), then for NLMSG_ERROR an i32 error.
        if got < 20 || u16::from_ne_bytes([answer[4], answer[5]]) != libc::NLMSG_ERROR as u16 {
            return Err(io::Error::other(
                "sock_diag answered something else than an ack",
            ));
        }
        let error = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
        match error {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }
}

/// Whether this kernel lets nbt destroy sockets: asks to destroy one that cannot exist (port 0
/// to port 0). ENOENT means the request was understood.
pub fn probe() -> Result<(), String> {
    let diag = SockDiag::open().map_err(|e| format!("no sock_diag netlink socket: {e}"))?;
    let nobody = TcpSocket {
        local: (IpAddr::from([127, 0, 0, 1]), 0),
        remote: (IpAddr::from([127, 0, 0, 1]), 0),
        cookie: 0,
    };
    match diag.destroy(&nobody) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            Err("the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is not set)".into())
        }
        Err(e) => Err(format!("sock_diag SOCK_DESTROY failed: {e}")),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_kernels_layout() {
        // nlmsghdr 16 + inet_diag_req_v2 56.
        assert_eq!(size_of::<DestroyRequest>(), 72);
        assert_eq!(size_of::<SockId>(), 48);
    }
}
