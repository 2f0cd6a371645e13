"""The tool server of test_transparent.py, run inside the "tools" network namespace.

    python3 transparent_tool.py LOG [CERT KEY]

HTTP on ports 80 and 8080, HTTPS on 443 with CERT and KEY (plain HTTP there without them),
and UDP on 443 (where QUIC goes) and 5353, each over IPv4 and IPv6. Every connection,
request and datagram is appended to LOG as a JSON line (what reached the tool, and on which
local address and port), so the test can prove what did NOT reach it. An HTTP request is
answered 200 with a JSON body echoing its path, Host and Via. ICMPv6 messages that carry
PROBE_MARKER (crafted neighbour discovery) are logged too. Prints "ready" once bound.
"""
import json
import socket
import ssl
import socketserver
import sys
import threading

LOG = sys.argv[1]
TLS = None
if len(sys.argv) > 3:
    TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLS.load_cert_chain(sys.argv[2], sys.argv[3])
lock = threading.Lock()
PROBE_MARKER = b"tollgate-probe"


def record(entry):
    with lock, open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        local = self.request.getsockname()
        where = {"local": local[0], "port": local[1]}
        record(dict(where, event="connection"))
        self.request.settimeout(5)
        if TLS is not None and local[1] == 443:
            try:
                self.request = TLS.wrap_socket(self.request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                record(dict(where, event="tls_failed", error=str(e)))
                return
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        record(dict(where, event="request", line=head[0], headers=headers))
        body = json.dumps({"tool": "ok", "path": parts[1] if len(parts) > 1 else "",
                           "host": headers.get("host", ""), "via": headers.get("via", ""),
                           "local": local[0], "port": local[1]}).encode()
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


class Server4(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server4):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        local = self.server.server_address
        record({"event": "datagram", "local": local[0], "port": local[1],
                "data": self.request[0].decode("latin-1")})


def icmpv6(s):
    """Every ICMPv6 message reaches a raw socket before the kernel judges it: ND the kernel
    would drop (a hop limit below 255) is seen here too."""
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
    while True:
        data, ancillary, _, peer = s.recvmsg(65535, 1024)
        if PROBE_MARKER not in data:
            continue
        entry = {"event": "icmpv6", "local": "", "port": 0, "type": data[0], "from": peer[0],
                 "data": data[data.index(PROBE_MARKER):].decode("latin-1")}
        for level, kind, value in ancillary:
            if kind == socket.IPV6_PKTINFO:
                entry["local"] = socket.inet_ntop(socket.AF_INET6, value[:16])
            elif kind == socket.IPV6_HOPLIMIT:
                entry["hop_limit"] = int.from_bytes(value[:4], sys.byteorder)
        record(entry)


class Udp4(socketserver.ThreadingUDPServer):
    allow_reuse_address = True


class Udp6(Udp4):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


servers = []
for port in (80, 443, 8080):
    servers.append(Server4(("0.0.0.0", port), Handler))
    servers.append(Server6(("::", port), Handler))
for port in (443, 5353):
    servers.append(Udp4(("0.0.0.0", port), Udp))
    servers.append(Udp6(("::", port), Udp))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
threading.Thread(target=icmpv6, args=(raw6,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # runs until the test closes our stdin (or kills us)
