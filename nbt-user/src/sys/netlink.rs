//! Root qdiscs over rtnetlink: the fq qdisc that EDT latency needs is put on an interface for a
//! run and taken off after, which gives the interface its default qdisc back. Only an interface
//! whose root qdisc is the kernel's default is touched: one with a qdisc of its own (an operator's
//! shaping) is refused, never replaced. And the ifb device of a run's ingress queue, made and
//! deleted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ECHO: u16 = 0x8;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 1;
/// What a hardware address's family says of an interface (`SIOCGIFHWADDR`).
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// cls_bpf's options: its actions, the program's descriptor and name.
const TCA_BPF_ACT: u16 = 1;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
/// An action's kind and options; mirred's parameters (`struct tc_mirred`).
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TCA_EGRESS_REDIR: i32 = 1;
const TC_ACT_STOLEN: i32 = 4;
const ETH_P_ALL: u16 = 0x0003;

/// The start of the name of every ingress queue device nbt makes (`nbt-q-PID`): left out of the
/// interfaces nbt acts on, whichever run made it.
pub const QUEUE_DEVICE_PREFIX: &str = "nbt-q-";
/// fq's options: its limit in packets in all, and per flow.
pub const TCA_FQ_PLIMIT: u16 = 1;
pub const TCA_FQ_FLOW_PLIMIT: u16 = 2;

/// The clsact qdisc's parent and handle (TC_H_CLSACT, TC_H_MAKE(TC_H_CLSACT, 0)).
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// The clsact qdisc's two hooks, as a filter's parent (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_*)).
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;

/// `nlmsghdr` + `tcmsg` + one `TCA_KIND` attribute, as the kernel reads them (host byte order).
fn message(kind_of_request: u16, flags: u16, ifindex: i32, qdisc: &str) -> Vec<u8> {
    message_at(
        kind_of_request,
        flags | NLM_F_ACK,
        ifindex,
        qdisc,
        TC_H_ROOT,
        0,
    )
}

/// Appends a `TCA_OPTIONS` attribute that nests one u32 attribute per option to a message.
fn with_options(msg: Vec<u8>, options: &[(u16, u32)]) -> Vec<u8> {
    if options.is_empty() {
        return msg;
    }
    let nested: Vec<u8> = options
        .iter()
        .flat_map(|(kind, value)| attribute(*kind, &value.to_ne_bytes()))
        .collect();
    with_attribute(msg, &attribute(TCA_OPTIONS | NLA_F_NESTED, &nested))
}

/// Appends an attribute (from [`attribute`]) to a message, and counts it in its length.
fn with_attribute(mut msg: Vec<u8>, attribute: &[u8]) -> Vec<u8> {
    msg.extend_from_slice(attribute);
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg
}

fn message_at(
    kind_of_request: u16,
    flags: u16,
    ifindex: i32,
    qdisc: &str,
    parent: u32,
    handle: u32,
) -> Vec<u8> {
    let mut body = tcmsg(ifindex, handle, parent, 0);
    if !qdisc.is_empty() {
        body.extend(attribute(TCA_KIND, &nul_terminated(qdisc)));
    }
    framed(kind_of_request, flags, &body)
}

/// `struct tcmsg`: family, pad, pad, ifindex, handle, parent, info.
fn tcmsg(ifindex: i32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut body = vec![0u8, 0, 0, 0];
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&handle.to_ne_bytes());
    body.extend_from_slice(&parent.to_ne_bytes());
    body.extend_from_slice(&info.to_ne_bytes());
    body
}

/// `body` behind an `nlmsghdr`, as the kernel reads it (host byte order).
fn framed(kind_of_request: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind_of_request.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    out.extend_from_slice(body);
    out
}

/// A netlink attribute holding `value`, padded to 4 bytes.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

/// A string as netlink takes it: with its NUL.
fn nul_terminated(text: &str) -> Vec<u8> {
    [text.as_bytes(), &[0]].concat()
}

/// The messages in one read of netlink's answers, by (kind, bytes from the message on), up to
/// the first that is cut short.
fn messages(answer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= answer.len() {
        let len = u32_at(answer, at).unwrap_or(0) as usize;
        out.push((u16_at(answer, at + 4).unwrap_or(NLMSG_DONE), &answer[at..]));
        if len < 16 {
            break;
        }
        at += (len + 3) & !3;
    }
    out
}

/// Opens a netlink route socket of our own (closed when dropped) and sends `msg` on it.
fn send_request(msg: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor, owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and no one else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `msg` outlives the call.
    if unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// One read of the kernel's answers into `buffer`: how many bytes came.
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` outlives the call and is as long as we say.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends one request and returns the kernel's first answer.
fn exchange(msg: &[u8]) -> io::Result<Vec<u8>> {
    let socket = send_request(msg)?;
    let mut answer = vec![0u8; 16384];
    let n = receive(&socket, &mut answer)?;
    if n < 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink answer",
        ));
    }
    answer.truncate(n);
    Ok(answer)
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The kernel's answer as a Result when it is an error message (0: an acknowledgement).
fn error_in(answer: &[u8]) -> Option<io::Result<()>> {
    if u16_at(answer, 4)? != NLMSG_ERROR {
        return None;
    }
    let error = u32_at(answer, 16)? as i32;
    Some(match error {
        0 => Ok(()),
        _ => Err(io::Error::from_raw_os_error(-error)),
    })
}

/// Sends one request that asks for an acknowledgement and returns it as a Result.
fn request(msg: &[u8]) -> io::Result<()> {
    error_in(&exchange(msg)?).unwrap_or_else(|| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no netlink acknowledgement",
        ))
    })
}

/// Puts `qdisc` with `options` (u32 attributes of its own, the kernel's defaults for the rest)
/// at the root of interface `ifindex`, refusing to replace a root qdisc someone configured
/// (EEXIST).
pub fn add_root(ifindex: u32, qdisc: &str, options: &[(u16, u32)]) -> io::Result<()> {
    request(&with_options(
        message(
            RTM_NEWQDISC,
            NLM_F_CREATE | NLM_F_EXCL,
            ifindex as i32,
            qdisc,
        ),
        options,
    ))
}

/// Deletes the root qdisc of `ifindex`: the kernel puts its default back.
pub fn delete_root(ifindex: u32) -> io::Result<()> {
    request(&message(RTM_DELQDISC, 0, ifindex as i32, ""))
}

/// Deletes the clsact qdisc of `ifindex` (and the tc filters on it).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    request(&message_at(
        RTM_DELQDISC,
        NLM_F_ACK,
        ifindex as i32,
        "",
        TC_H_CLSACT,
        CLSACT_HANDLE,
    ))
}

/// Whether any tc filter (nbt's or anyone's) hangs off the clsact qdisc of `ifindex`, on its
/// ingress or its egress.
pub fn clsact_has_filters(ifindex: u32) -> io::Result<bool> {
    for hook in [CLSACT_INGRESS, CLSACT_EGRESS] {
        let msg = message_at(RTM_GETTFILTER, NLM_F_DUMP, ifindex as i32, "", hook, 0);
        if dump(&msg)?.contains(&RTM_NEWTFILTER) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends a dump request and returns the kinds of the messages that answer it, up to the end.
fn dump(msg: &[u8]) -> io::Result<Vec<u16>> {
    let socket = send_request(msg)?;
    let mut kinds = Vec::new();
    let mut answer = vec![0u8; 32768];
    loop {
        let n = receive(&socket, &mut answer)?;
        for (kind, message) in messages(&answer[..n]) {
            match kind {
                NLMSG_DONE => return Ok(kinds),
                NLMSG_ERROR => {
                    error_in(message).unwrap_or(Ok(()))?;
                    return Ok(kinds);
                }
                kind => kinds.push(kind),
            }
        }
        if n == 0 {
            return Ok(kinds);
        }
    }
}

/// `nlmsghdr` + `ifinfomsg` (+ attributes), as the kernel reads them.
fn link_message(
    kind_of_request: u16,
    flags: u16,
    ifindex: i32,
    up: bool,
    attributes: &[u8],
) -> Vec<u8> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut body = vec![0u8, 0, 0, 0];
    body.extend_from_slice(&ifindex.to_ne_bytes());
    let up = if up { IFF_UP } else { 0 };
    body.extend_from_slice(&up.to_ne_bytes());
    body.extend_from_slice(&up.to_ne_bytes());
    body.extend_from_slice(attributes);
    framed(kind_of_request, flags | NLM_F_ACK, &body)
}

/// Makes an ifb device named `name`, up, in the calling thread's network namespace; its index.
/// EOPNOTSUPP when the kernel has no ifb driver, EEXIST when the name is taken.
pub fn add_ifb(name: &str) -> io::Result<u32> {
    let mut attributes = attribute(IFLA_IFNAME, &nul_terminated(name));
    attributes.extend(attribute(
        IFLA_LINKINFO | NLA_F_NESTED,
        &attribute(IFLA_INFO_KIND, &nul_terminated("ifb")),
    ));
    request(&link_message(
        RTM_NEWLINK,
        NLM_F_CREATE | NLM_F_EXCL,
        0,
        true,
        &attributes,
    ))?;
    index_of(name).ok_or_else(io::Error::last_os_error)
}

/// The index of interface `name` in the calling thread's network namespace, if it has one.
pub fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => None,
        index => Some(index),
    }
}

/// Puts a classic (not direct-action) cls_bpf filter running program `fd` (named `name`) on the
/// ingress of interface `ifindex`'s clsact qdisc, whose action, act_mirred, redirects what the
/// program matches to the egress of interface `to` (as `tc filter add dev IF ingress bpf obj ...
/// action mirred egress redirect dev TO`). The kernel picks its priority, in front of the
/// filters already there; returns (priority, handle).
pub fn add_bpf_redirect_filter(
    ifindex: u32,
    fd: i32,
    name: &str,
    to: u32,
) -> io::Result<(u16, u32)> {
    // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
    let mut mirred = Vec::new();
    for word in [0i32, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR] {
        mirred.extend_from_slice(&word.to_ne_bytes());
    }
    mirred.extend_from_slice(&to.to_ne_bytes());
    let mut action = attribute(TCA_ACT_KIND, &nul_terminated("mirred"));
    action.extend(attribute(
        TCA_ACT_OPTIONS | NLA_F_NESTED,
        &attribute(TCA_MIRRED_PARMS, &mirred),
    ));
    // The action list: the first (and only) action, at order 1.
    let actions = attribute(1 | NLA_F_NESTED, &action);
    let mut options = attribute(TCA_BPF_ACT | NLA_F_NESTED, &actions);
    options.extend(attribute(TCA_BPF_FD, &fd.to_ne_bytes()));
    options.extend(attribute(TCA_BPF_NAME, &nul_terminated(name)));
    let mut body = tcmsg(
        ifindex as i32,
        0,
        CLSACT_INGRESS,
        u32::from(ETH_P_ALL.to_be()),
    );
    body.extend(attribute(TCA_KIND, &nul_terminated("bpf")));
    body.extend(attribute(TCA_OPTIONS | NLA_F_NESTED, &options));
    let flags = NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO | NLM_F_ACK;
    let answer = exchange(&framed(RTM_NEWTFILTER, flags, &body))?;
    // The echo of the new filter (its tcmsg: handle at 24, info at 32, priority in info's high
    // half), then the acknowledgement; or an error.
    for (kind, message) in messages(&answer) {
        match kind {
            RTM_NEWTFILTER => {
                let handle = u32_at(message, 24).unwrap_or(0);
                let priority = (u32_at(message, 32).unwrap_or(0) >> 16) as u16;
                return Ok((priority, handle));
            }
            NLMSG_ERROR => {
                error_in(message).unwrap_or(Ok(()))?;
                break;
            }
            _ => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no echo of the new filter",
    ))
}

/// Deletes the network device `ifindex` (its qdiscs and filters go with it).
pub fn delete_link(ifindex: u32) -> io::Result<()> {
    request(&link_message(RTM_DELLINK, 0, ifindex as i32, false, &[]))
}

/// The interfaces whose arriving packets can go through a run's ingress queue: those with an
/// Ethernet header, loopback included (the redirect to the ifb needs a link-layer header in
/// front of the IP packet; a WireGuard or tun device has none), but no queue device.
pub fn receiving_interfaces() -> Vec<(u32, String)> {
    let mut all = interfaces();
    if let Some(lo) = loopback() {
        all.insert(0, lo);
    }
    all.into_iter()
        .filter(|(_, name)| {
            matches!(
                hardware_type(name),
                Some(ARPHRD_ETHER) | Some(ARPHRD_LOOPBACK)
            )
        })
        .collect()
}

/// Loopback's (index, name), when the namespace has it.
pub fn loopback() -> Option<(u32, String)> {
    // SAFETY: a NUL-terminated literal.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => None,
        index => Some((index, "lo".to_string())),
    }
}

/// The hardware type of interface `name` (`ARPHRD_*`), asked of an ioctl socket of this
/// thread's network namespace.
fn hardware_type(name: &str) -> Option<u16> {
    // SAFETY: socket(2) returns a new descriptor, owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is open and no one else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return None;
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    // SAFETY: the ioctl fills the ifreq we own with the hardware address.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) } < 0 {
        return None;
    }
    // SAFETY: SIOCGIFHWADDR wrote the hardware address's sockaddr into the union.
    Some(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// The interfaces of the calling thread's network namespace, but loopback and nbt's ingress
/// queue devices, by (index, name).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex(3) returns an array ended by a zero entry, freed by if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            if name != "lo" && !name.starts_with(QUEUE_DEVICE_PREFIX) {
                out.push(((*entry).if_index, name));
            }
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_laid_out_as_the_kernel_reads_it() {
        let msg = message(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, 7, "fq");
        // 16 header + 20 tcmsg + 4 attribute header + "fq\0" padded to 4.
        assert_eq!(msg.len(), 16 + 20 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 44);
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
            RTM_NEWQDISC
        );
        assert_eq!(u16::from_ne_bytes(msg[6..8].try_into().unwrap()), 0x605);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(msg[28..32].try_into().unwrap()),
            TC_H_ROOT
        );
        assert_eq!(u16::from_ne_bytes(msg[36..38].try_into().unwrap()), 7);
        assert_eq!(&msg[40..43], b"fq\0");
        let delete = message(RTM_DELQDISC, 0, 7, "");
        assert_eq!(delete.len(), 36);
        let fq = with_options(msg.clone(), &[(TCA_FQ_FLOW_PLIMIT, 10_000)]);
        assert_eq!(fq.len(), 44 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(fq[0..4].try_into().unwrap()), 56);
        assert_eq!(u16::from_ne_bytes(fq[44..46].try_into().unwrap()), 12);
        assert_eq!(u16::from_ne_bytes(fq[46..48].try_into().unwrap()), 0x8002);
        assert_eq!(u16::from_ne_bytes(fq[50..52].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(fq[52..56].try_into().unwrap()), 10_000);
    }
}
