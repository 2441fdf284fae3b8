"""psdclip data serve: a read-only static HTTP server for a synthetic source, on loopback by default.

Used by `psdclip data serve`, the demo and the tests (in-process, in a thread), so that the real
img2dataset download path runs over 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def list_directory(self, path):  # no directory listings
        self.send_error(404, "Not Found")
        return None

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass


class StaticServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def make_server(directory: str, host: str = "127.0.0.1", port: int = 0) -> StaticServer:
    return StaticServer((host, port), functools.partial(_Handler, directory=directory))


def stable_port(directory: str) -> int:
    """A port derived from the folder's path, so that a rerun serves the same URLs (and a dataset built
    from them is recognised as already ingested, or resumed against the same addresses)."""
    import hashlib

    return 20000 + int(hashlib.md5(os.path.abspath(directory).encode()).hexdigest(), 16) % 20000


@contextlib.contextmanager
def serving(directory: str, host: str = "127.0.0.1", port: int | None = None):
    """Serve directory in a background thread; yields the base URL. port None: the folder's stable port
    when it is free, else any free port; 0: any free port."""
    server = None
    if port is None:
        try:
            server = make_server(directory, host, stable_port(directory))
        except OSError:
            port = 0
    if server is None:
        server = make_server(directory, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
