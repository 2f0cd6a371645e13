"""CONNECT tunnels to a TLS origin and WebSocket-style upgrades."""
import json
import socket
import socketserver
import threading
import time
import unittest

from tollgate_harness import (Tollgate, TlsOrigin, UpgradeEchoOrigin, curl, parse_response, raw_exchange,
                              recv_until)


class TunnelTest(unittest.TestCase):
    def test_connect_tunnel_to_a_tls_origin(self):
        with TlsOrigin() as origin, Tollgate({"hosts": {"allow": ["localhost", "127.0.0.1"]}}) as tg:
            rc, out, err = curl("--cacert", origin.cert, f"https://localhost:{origin.port}/",
                                proxy=tg.proxy, env_proxy=True)
            self.assertEqual(rc, 0, err)
            self.assertEqual(out, b"tls-hello")

    def test_connect_to_a_denied_host_is_halted(self):
        with Tollgate({"hosts": {"allow": ["localhost"], "deny": ["evil.example"]}}) as tg:
            out, _ = raw_exchange(tg.proxy_port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
                                  read_until_close=False)
            status, headers, body = parse_response(out)
            self.assertEqual(status, 403)
            self.assertEqual(json.loads(body)["rule"], "hosts.deny")
            rc, out, err = curl("https://evil.example/", proxy=tg.proxy, env_proxy=True)
            self.assertNotEqual(rc, 0)
            self.assertIn("403", err)

    def test_upgrade_is_tunnelled_once_allowed(self):
        with UpgradeEchoOrigin() as origin, Tollgate() as tg:
            s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
            s.sendall(b"GET http://127.0.0.1:%d/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n" % (origin.port, origin.port))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                self.assertTrue(chunk)
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
            self.assertIn(b"upgrade: websocket", head.lower())
            for message in (b"ping-1", b"x" * 100000, b"ping-3"):
                s.sendall(message)
                got = rest
                rest = b""
                while len(got) < len(message):
                    chunk = s.recv(65536)
                    self.assertTrue(chunk)
                    got += chunk
                self.assertEqual(got, message)
            s.close()

    def test_an_upgrade_to_another_protocol_than_websocket_is_not_sent_on(self):
        """h2c after a 101 would carry HTTP/2 requests no one decides: the Upgrade is not
        offered to the upstream, the call goes on as HTTP/1.1 on a connection that stays
        usable, and a 101 the upstream sends anyway is refused."""
        heads = []

        class AnyUpgrade(socketserver.BaseRequestHandler):
            def handle(self):
                while True:  # one request at a time: the client waits for each answer
                    head = recv_until(self.request, b"\r\n\r\n")
                    if not head.endswith(b"\r\n\r\n"):
                        return
                    heads.append(head.lower())
                    if b"\r\nupgrade:" in head.lower() or b"/force-101" in head:
                        self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                             b"Connection: Upgrade\r\n\r\n")
                        return
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), AnyUpgrade)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            with Tollgate() as tg:
                s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
                req = (b"GET http://127.0.0.1:%d/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                       b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
                s.sendall(req % (port, port))
                data = recv_until(s, b"plain")
                self.assertTrue(data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain"), data)
                self.assertNotIn(b"upgrade", heads[0])
                # The connection goes on as HTTP/1.1.
                s.sendall(b"GET http://127.0.0.1:%d/b HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
                data = recv_until(s, b"plain")
                self.assertTrue(data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain"), data)
                s.close()
                out, _ = raw_exchange(tg.proxy_port, b"GET http://127.0.0.1:%d/force-101 HTTP/1.1\r\n"
                                      b"Host: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n" % (port, port),
                                      read_until_close=False)
                self.assertEqual(parse_response(out)[0], 502, out)
        finally:
            server.shutdown()
            server.server_close()

    def test_upgrade_to_a_denied_host_is_halted(self):
        with Tollgate({"hosts": {"allow": [], "deny": ["*"]}}) as tg:
            out, _ = raw_exchange(tg.proxy_port, b"GET http://127.0.0.1:9/ws HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
                                  b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", read_until_close=False)
            self.assertEqual(parse_response(out)[0], 403)


if __name__ == "__main__":
    unittest.main()
