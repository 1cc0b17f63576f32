"""A local HTTP server that honours Range requests, for the download tests (fixture `server`,
registered in conftest.py)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest


class RangeServer(ThreadingHTTPServer):
    files: dict[str, bytes]
    honor_range = True
    ranges: list[str | None]
    bytes_sent = 0


class _RangeHandler(BaseHTTPRequestHandler):
    server: RangeServer

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        if body is None:
            self.send_error(404)
            return
        start = int(requested.removeprefix("bytes=").split("-")[0]) if requested else 0
        if requested and self.server.honor_range and start < len(body):
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            payload = body[start:]
        else:
            self.send_response(200)
            payload = body
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.server.bytes_sent += len(payload)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = RangeServer(("127.0.0.1", 0), _RangeHandler)
    srv.files, srv.ranges = {}, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url_of(srv: RangeServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


PAYLOAD = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()

