"""Small servers on loopback that the sandbox plants incidents in: an SMTP server (enough of
RFC 5321 for a client's session: EHLO, MAIL, RCPT, DATA, RSET, QUIT, no TLS or AUTH) and an
app's Prometheus endpoint. aiosmtpd, what the tests use, is no runtime dependency: the
sandbox runs where only the runtime dependencies are installed."""

from __future__ import annotations

import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

METRICS_BODY = b"""\
# HELP http_requests_total Requests served.
# TYPE http_requests_total counter
http_requests_total{route="/api/v1/manga",status="200"} 1027
# HELP emails_sent_total Emails sent.
# TYPE emails_sent_total counter
emails_sent_total{status="error"} 42
"""


class SmtpServer:
    """An SMTP server on 127.0.0.1 that answers RCPT TO with rcpt_reply (e.g. b"550 5.7.1
    Relaying denied") and accepts everything else; messages are read and dropped."""

    def __init__(self, rcpt_reply: bytes = b"250 2.1.5 OK") -> None:
        reply = rcpt_reply

        class Session(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self) -> None:
                self.wfile.write(b"220 sandbox.test ESMTP\r\n")
                while line := self.rfile.readline(1024):
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        self.wfile.write(b"250-sandbox.test\r\n250 8BITMIME\r\n")
                    elif verb == b"RCPT":
                        self.wfile.write(reply + b"\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        while (body := self.rfile.readline(65536)) and body != b".\r\n":
                            pass
                        self.wfile.write(b"250 2.0.0 Ok: queued\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 Bye\r\n")
                        return
                    elif verb in (b"MAIL", b"RSET", b"NOOP"):
                        self.wfile.write(b"250 2.0.0 Ok\r\n")
                    else:
                        self.wfile.write(b"502 5.5.2 Command not recognized\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Session)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MetricsApp:
    """GET /metrics: Prometheus text to anyone, as an app with METRICS_ENABLED=true and no
    METRICS_GUARD serves it (seed 001)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/metrics"
                body = METRICS_BODY if found else b"not found\n"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
