"""A tiny HTTP server on 127.0.0.1 that answers each request with the next canned response.

For the ADEME client's handling of what no data-fair sends but a proxy or a cache may (headers, bodies,
redirects): the client talks real HTTP through requests, the test says exactly what comes back.
"""

from __future__ import annotations

import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dpe_ingest.ademe import AdemeClient


class CannedServer:
    """``serve(*responses)``: each GET takes the next ``(status, headers, body)``; when none is left, 599."""

    def __init__(self):
        self.responses: deque = deque()
        self.paths: list[str] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                canned.paths.append(self.path)
                status, headers, body = canned.responses.popleft() if canned.responses else (599, {}, b"")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def serve(self, *responses) -> None:
        self.responses.clear()
        self.paths.clear()
        self.responses.extend(responses)

    def client(self, **kw) -> tuple[AdemeClient, list[float]]:
        """An ADEME client of this server whose waits are recorded, not slept."""
        import random

        slept: list[float] = []
        opts = {"max_retries": 2, "retry_max_s": 300.0, "timeout_s": 5.0, "rng": random.Random(0),
                "sleep": slept.append, **kw}
        return AdemeClient(self.url + "/datasets/dpe03existant", **opts), slept

    def __enter__(self) -> "CannedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
