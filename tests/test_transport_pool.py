"""Reading an answer whose connection goes back to its pool (and may be closed there) as soon as
its last byte is read: nothing may touch that connection's socket afterwards."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from crawler import http


class _Small(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"[" + b",".join(b'{"a":%d}' % i for i in range(50)) + b"]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Small)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_answer_whose_connection_is_closed_by_a_full_pool_reads_whole(server):
    """Two answers in flight on a pool of one: the second connection, given back last, is closed
    by the pool when its body ends; reading that body must not touch its socket afterwards (it
    raised OSError EBADF, which a Dask listing task reported as 'the listing task failed')."""
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, maxsize=1, block=False)
    first = pool.urlopen("GET", "/a", preload_content=False, decode_content=False, retries=0)
    second = pool.urlopen("GET", "/b", preload_content=False, decode_content=False, retries=0)
    deadline = time.monotonic() + 30
    assert http.read_answer(first, 1 << 20, deadline, 10.0).startswith(b"[")
    body = http.read_answer(second, 1 << 20, deadline, 10.0)
    assert body.startswith(b"[") and body.endswith(b"]")
    pool.close()
