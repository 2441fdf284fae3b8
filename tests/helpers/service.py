"""A `psdclip serve` process on a free loopback port, for the tests that talk to a real service."""
import os
import socket
import subprocess
import time

import requests

from helpers.cli import BIN


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(*args, env=None):
    """`psdclip serve ARGS` on a free loopback port, once /healthz answers: (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(BIN, "psdclip"), "serve", *map(str, args), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(base + "/healthz", timeout=1).ok:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode()[-2000:])
