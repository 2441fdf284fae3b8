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

from ..core import logs
from ..core.errors import PsdclipError

from .sources import description_files

log = logs.get(__name__, "[psdclip] ")


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


# Linux hands out outgoing connections' local ports from 32768 up (net.ipv4.ip_local_port_range): a stable port
# below that is not taken by some client's connection at the moment a rerun wants it
STABLE_PORTS = (20000, 32768)


# a source folder that describes itself: what it was generated from, wherever it lies
SOURCE_FILES = description_files()


def source_identity(directory: str) -> str:
    """What a served folder is: a generated source's own description (synth.json, emoji.json) without the folder it
    was written to, else the folder's path."""
    import json

    for name in SOURCE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                break
            if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
                meta = {**meta, "config": {k: v for k, v in meta["config"].items() if k not in ("out", "cache")}}
            return name + json.dumps(meta, sort_keys=True, default=str)
    return os.path.abspath(directory)


def stable_port(directory: str) -> int:
    """A port derived from what the folder is (source_identity), so that a rerun serves the same URLs (a dataset
    built from them is recognised as already ingested, or resumed against the same addresses) and the same
    generated source, made in another folder or another clone, gives the same URLs: the same keys, the same
    shards and the same numbers (the keys are hashes of the URLs, and rows are dealt to shards by key)."""
    import hashlib

    lo, hi = STABLE_PORTS
    return lo + int(hashlib.md5(source_identity(directory).encode()).hexdigest(), 16) % (hi - lo)


def _port_in(url_list: str) -> int | None:
    """The port of the first URL in a URL list that write_url_list wrote (header, then url,caption rows)."""
    from urllib.parse import urlsplit

    with open(url_list) as f:
        f.readline()
        first = f.readline().split(",", 1)[0]
    try:
        return urlsplit(first).port
    except ValueError:
        return None


@contextlib.contextmanager
def serving(directory: str, host: str = "127.0.0.1", port: int | None = None, again: str | None = None):
    """Serve directory in a background thread; yields the base URL. port None: the folder's stable port
    when it is free, else any free port; 0: any free port. again: the URL list an earlier run wrote for this
    folder, if it exists; then the port its URLs point at, or a one-line error when that port is taken (a dataset
    built from those URLs would take URLs on another port for new images)."""
    server = None
    if again and os.path.isfile(again) and (before := _port_in(again)):
        try:
            server = make_server(directory, host, before)
        except OSError as e:
            raise PsdclipError(f"{directory}: cannot serve it again on {host}:{before}, where the URLs of {again} "
                               f"point ({e.strerror or e}); a dataset built from them would take URLs on another "
                               f"port for new images: free the port and rerun") from None
    elif port is None:
        stable = stable_port(directory)
        try:
            server = make_server(directory, host, stable)
        except OSError as e:
            log.warning(f"{directory}: its stable port {stable} is taken ({e.strerror or e}); serving "
                        f"on another, so its URLs, and the keys and shards of a dataset built from them, differ from "
                        f"a build that had the stable port")
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
