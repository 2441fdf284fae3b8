"""One writer at a time per folder: an advisory lock file (fcntl.flock) that the OS drops when the holder ends, even by
kill -9, and that names its holder for the next one to read."""
from __future__ import annotations

import contextlib
import os

from .errors import InputError


@contextlib.contextmanager
def folder_lock(path: str, busy: str):
    """Hold the lock file `path` for the block; if another process holds it, an InputError: `busy` with the
    holder's pid and host put in for `{holder}`."""
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(busy.format(holder=holder)) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
    finally:
        f.close()
