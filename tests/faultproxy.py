"""A small HTTP proxy on loopback in front of the moto S3 server, breaking requests the way networks and stores do:
an answer lost after the request was applied (the client retries it), or conditional headers a store ignores."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CONDITIONAL = ("If-None-Match", "If-Match")


class FaultProxy:
    """``lose(header, n)``: the next ``n`` requests carrying ``header`` are forwarded and applied upstream, then
    their connection is closed unanswered. ``strip``: conditional headers never reach the store. Stopped by
    :meth:`close` (the test's own server thread, nothing else)."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.strip = False
        self.to_lose: dict[str, int] = {}
        self.lost: list[str] = []  # "METHOD path" of each answer dropped
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def lose(self, header: str, n: int = 1) -> None:
        with self.lock:
            self.to_lose[header.lower()] = n

    def _drop(self, headers: dict[str, str]) -> bool:
        with self.lock:
            for name, left in self.to_lose.items():
                if left and name in {k.lower() for k in headers}:
                    self.to_lose[name] = left - 1
                    return True
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if not (proxy.strip and k in CONDITIONAL) and k.lower() != "expect"}
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                up.request(self.command, self.path, body=body, headers=headers)
                answer = up.getresponse()
                data = answer.read()
                up.close()
                if proxy._drop(headers):  # applied upstream; the client never hears of it
                    proxy.lost.append(f"{self.command} {self.path}")
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # a HEAD's answer has no body, but the length of the object it describes
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
