"""A real HTTP server on 127.0.0.1 for the pipeline tests: serves a synthetic source and, under /bad/,
the faulty responses that web data has. It counts requests per path."""
from __future__ import annotations

import collections
import hashlib
import io
import os
import struct
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def jpeg_bytes(colour=(200, 30, 30), size=48) -> bytes:
    """A JPEG with some texture (so that its entropy-coded data is most of the file)."""
    import numpy as np

    rng = np.random.default_rng(list(colour))
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def __init__(self, root: str | None, slow_s: float = 3.0):
        self.root = root
        self.slow_s = slow_s
        self.hits: collections.Counter = collections.Counter()
        self.flaky: dict[str, int] = {}  # path -> number of 503s still to send
        self.delay_s = 0.0  # added to every /img/ response
        self.times: dict[str, list] = collections.defaultdict(list)  # path -> time.monotonic() of each request
        self.throttle_first = 1  # /throttle/ paths: this many 429s (Retry-After: retry_after) before the image
        self.retry_after = "1"
        self.limited = True  # /limited/ paths answer 429 (Retry-After: retry_after) while this holds
        self.stuck = True  # /stuck/ paths trickle a byte a second while this holds
        # /robots.txt per host name (the Host header's, without the port): (HTTP code, body); else a 404
        self.robots: dict[str, tuple[int, str]] = {}
        self.agents: collections.Counter = collections.Counter()  # User-Agent headers seen
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (a timeout test): expected
        super().handle_error(request, client_address)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        srv: Server = self.server  # type: ignore[assignment]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        with srv.lock:
            srv.agents[self.headers.get("User-Agent", "")] += 1
            srv.hits[path] += 1
            srv.times[path].append(time.monotonic())
            flaky_left = srv.flaky.get(path, 0)
            if flaky_left:
                srv.flaky[path] = flaky_left - 1
        if flaky_left:
            return self._send(503, b"try later", "text/plain")
        if path == "/robots.txt":
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            code, body = srv.robots.get(host, (404, "not found"))
            return self._send(code, body.encode(), "text/plain")
        for prefix, refuse in (("/throttle/", srv.hits[path] <= srv.throttle_first), ("/limited/", srv.limited)):
            if path.startswith(prefix) and refuse:
                return self._send(429, b"slow down", "text/plain", [("Retry-After", srv.retry_after)])
        if path.startswith("/stuck/") and srv.stuck:
            path = "/bad/trickle.jpg"
        if path.startswith(("/throttle/", "/limited/", "/stuck/")):
            path = "/ok/" + path.split("/", 2)[2]
        if path.startswith("/img/") and srv.root:
            if srv.delay_s:
                time.sleep(srv.delay_s)
            rel = path[len("/img/"):]
            full = os.path.realpath(os.path.join(srv.root, rel))
            if not full.startswith(os.path.realpath(srv.root) + os.sep) or not os.path.isfile(full):
                return self._send(404, b"no", "text/plain")
            with open(full, "rb") as f:
                return self._send(200, f.read())
        jpg = jpeg_bytes()
        routes = {
            "/bad/404.jpg": lambda: self._send(404, b"not found", "text/plain"),
            "/bad/500.jpg": lambda: self._send(500, b"boom", "text/plain"),
            "/bad/html.jpg": lambda: self._send(200, b"<html><body>Not an image</body></html>", "text/html"),
            "/bad/truncated.jpg": lambda: self._send(200, jpg[: len(jpg) // 2]),
            "/bad/bomb.png": lambda: self._send(200, bomb_png(), "image/png"),
            "/bad/noai.jpg": lambda: self._send(200, jpg, headers=[("X-Robots-Tag", "noai")]),
            "/bad/redirect.jpg": lambda: self._send(302, b"", "text/plain", [("Location", "/ok/target.jpg")]),
            "/bad/redirect-file.jpg": lambda: self._send(302, b"", "text/plain",
                                                         [("Location", "file:///etc/passwd")]),
            # to an ftp:// listener on this server's own port (urllib would follow it and log in anonymously)
            "/bad/redirect-ftp.jpg": lambda: self._send(302, b"", "text/plain",
                                                        [("Location", f"ftp://127.0.0.1:{srv.server_address[1]}/x")]),
            "/bad/redirect-creds.jpg": lambda: self._send(
                302, b"", "text/plain", [("Location", f"http://u:pw@127.0.0.1:{srv.server_address[1]}/ok/x.jpg")]),
            "/bad/retry-after-superscript.jpg": lambda: self._send(429, b"slow down", "text/plain",
                                                                   [("Retry-After", "\u00b2")]),
        }
        if path == "/bad/redirect-ip.jpg":  # to the same server under another host name
            return self._send(302, b"", "text/plain",
                              [("Location", f"http://127.0.0.1:{srv.server_address[1]}/ok/target.jpg")])
        if path == "/bad/trickle.jpg":  # headers at once, then one byte a second
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpg)))
            self.end_headers()
            try:
                for b in jpg[:30]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(1.0)
            except OSError:
                pass
            return None
        if path in ("/bad/huge.jpg", "/bad/huge-said.jpg"):  # 64 MB of body; no Content-Length, or a false one
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if path == "/bad/huge-said.jpg":
                self.send_header("Content-Length", str(800 * 1024 * 1024))
            self.end_headers()
            try:
                self.wfile.write(jpg[:2])
                for _ in range(1024):  # 64 MB: more than loopback socket buffers hold
                    self.wfile.write(b"\0" * 65536)
                with srv.lock:
                    srv.hits["huge sent whole"] += 1
            except OSError:  # the client stopped reading: what a capped download does
                pass
            return None
        if path == "/bad/many-headers.jpg":  # more headers than http.client reads (100)
            self.send_response(200)
            for i in range(150):
                self.send_header(f"X-Filler-{i}", "x")
            self.send_header("Content-Length", str(len(jpg)))
            self.end_headers()
            self.wfile.write(jpg)
            return None
        if path == "/bad/chunked-cut.jpg":  # a chunked body that ends inside a chunk
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(jpg) + jpg[: len(jpg) // 2])
            return None
        if path == "/bad/slow.jpg":
            time.sleep(srv.slow_s)
            return self._send(200, jpg)
        if path in routes:
            return routes[path]()
        if path.startswith("/ok/"):  # a distinct image per path
            c = hashlib.md5(path.encode()).digest()
            return self._send(200, jpeg_bytes((c[0], c[1], c[2])))
        if path.startswith("/dup/"):  # the same image bytes for every path
            return self._send(200, jpg)
        return self._send(404, b"no route", "text/plain")
