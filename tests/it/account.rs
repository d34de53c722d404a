//! The byte counters of nbt's cgroup_skb programs against a known number of bytes over loopback.

use std::io::Read;
use std::net::{TcpListener, UdpSocket};

use nbt_integration_tests::{run_testbin, NoLeftovers};

#[test]
fn udp_datagrams_are_counted_exactly() {
    let guard = NoLeftovers::new();
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = receiver.local_addr().unwrap().to_string();
    let run = run_testbin(&[], &["udp-send", &addr, "1000", "100"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    // Each datagram is one IP packet: 20 bytes IPv4 header + 8 bytes UDP header + 100 bytes.
    assert_eq!(run.u64("/network/egress/packets"), 1000);
    assert_eq!(run.u64("/network/egress/bytes"), 1000 * 128);
    // The receiver is outside the run: nothing came in.
    assert_eq!(run.u64("/network/ingress/packets"), 0);
    guard.assert_clean();
}

#[test]
fn tcp_bytes_match_within_headers() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        received.len() as u64
    });
    let run = run_testbin(&[], &["tcp-send", &addr, &SENT.to_string()]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(server.join().unwrap(), SENT);

    // What TCP put on the wire: the payload, plus any retransmissions (a slow reader on loopback
    // can make the kernel drop and resend), as the sender's own TCP_INFO counts them.
    let report = run.stdout();
    let payload_on_wire = run.report_u64("payload_bytes_sent");
    assert!(payload_on_wire >= SENT, "{report}");
    let out_bytes = run.u64("/network/egress/bytes");
    let out_packets = run.u64("/network/egress/packets");
    // Each packet (a GSO super-packet counts once) carries at most 20 (IPv4) + 60 (TCP with
    // options) bytes of headers.
    assert!(
        out_bytes >= payload_on_wire,
        "{out_bytes} bytes counted out, {report}"
    );
    assert!(
        out_bytes <= payload_on_wire + out_packets * 80,
        "{out_bytes} bytes in {out_packets} packets, {report}"
    );
    // What came in is the server's ACKs, SYN-ACK and FIN: headers only.
    let in_bytes = run.u64("/network/ingress/bytes");
    let in_packets = run.u64("/network/ingress/packets");
    assert!(in_packets >= 2, "{in_packets} packets in");
    assert!(
        in_bytes <= in_packets * 80,
        "{in_bytes} bytes in {in_packets} header-only packets"
    );
    guard.assert_clean();
}
