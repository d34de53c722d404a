"""Workloads for the gate's tests: clients of every socket kind, each printing one line per
call ("MODE i ok", "MODE i EPERM", "MODE i ECONNABORTED 0.4 ms", ...).

usage: gate_client.py MODE HOST PORT COUNT
  http            COUNT GETs over one keep-alive connection (http.client); after a failure,
                  one new connection ("connect ok|EPERM")
  pipelined       COUNT GETs written at once on one connection, then their replies read
  udp-connected   COUNT datagrams from a connected UDP socket
  udp-sendto      COUNT datagrams from an unconnected UDP socket
  raw-udp         COUNT UDP datagrams from a raw socket, the kernel writing the IP header
  raw-hdrincl     COUNT UDP datagrams from a raw socket that writes its own IP header
"""
import errno
import http.client
import socket
import struct
import sys
import time

mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
v6 = ":" in host
family = socket.AF_INET6 if v6 else socket.AF_INET


def outcome(error):
    if error is None:
        return "ok"
    return errno.errorcode.get(error.errno, f"error {error}") if error.errno else str(error)


def timed(label, call):
    start = time.monotonic()
    try:
        call()
        print(f"{label} ok", flush=True)
        return True
    except OSError as e:
        ms = (time.monotonic() - start) * 1000
        print(f"{label} {outcome(e)} {ms:.1f} ms", flush=True)
        return False


def http_keepalive():
    conn = http.client.HTTPConnection(host, port, timeout=10)

    def get(i):
        conn.request("GET", f"/{i}")
        conn.getresponse().read()

    for i in range(count):
        if not timed(f"http {i}", lambda: get(i)):
            timed("connect", lambda: socket.create_connection((host, port), timeout=10))
            return


def pipelined():
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count)))
    received = b""
    while received.count(b"\r\n\r\nresponse ") < count:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    for i in range(received.count(b"\r\n\r\nresponse ")):
        print(f"pipelined {i} ok", flush=True)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(i, source_port):
    payload = b"datagram %d" % i
    header = struct.pack("!HHHH", source_port, port, 8 + len(payload), 0)
    return header + payload


def datagrams():
    target = (host, port)
    if mode == "udp-connected":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect(target)
        send = lambda i: sock.send(b"datagram %d" % i)
    elif mode == "udp-sendto":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        send = lambda i: sock.sendto(b"datagram %d" % i, target)
    elif mode == "raw-udp":
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        if v6:
            # The kernel writes the UDP checksum, mandatory over IPv6, at offset 6.
            sock.setsockopt(socket.IPPROTO_IPV6, 7, 6)  # IPV6_CHECKSUM
        send = lambda i: sock.sendto(udp(i, 40000), (host, 0))
    elif mode == "raw-hdrincl" and not v6:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        source, dest = socket.inet_aton("127.0.0.1"), socket.inet_aton(host)

        def packet(i):
            body = udp(i, 40000)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 17, 0, source, dest)
            return ip + body

        send = lambda i: sock.sendto(packet(i), (host, 0))
    elif mode == "raw-hdrincl":
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        source = dest = socket.inet_pton(socket.AF_INET6, host)

        def packet(i):
            body = bytearray(udp(i, 40000))
            pseudo = source + dest + struct.pack("!I3xB", len(body), 17)
            struct.pack_into("!H", body, 6, checksum(pseudo + bytes(body)) or 0xFFFF)
            ip = struct.pack("!IHBB", 6 << 28, len(body), 17, 64) + source + dest
            return ip + bytes(body)

        send = lambda i: sock.sendto(packet(i), (host, 0))
    else:
        sys.exit(f"unknown mode {mode}")
    for i in range(count):
        timed(f"{mode} {i}", lambda: send(i))
        time.sleep(0.02)


if mode == "http":
    http_keepalive()
elif mode == "pipelined":
    pipelined()
else:
    datagrams()
