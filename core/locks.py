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


@contextlib.contextmanager
def writer_lock(folder: str, lock: str, command: str, what: str, flag: str = "--out"):
    """One `psdclip COMMAND` writing `folder` at a time: the lock file folder/lock, and the one line a second writer
    gets (`FLAG FOLDER: another psdclip COMMAND (pid ... on HOST) is writing this WHAT; wait ...`). A folder the
    block made and left with nothing but the lock is removed again (a command refused early leaves no empty folder).
    For folders on an object store (no flock there) nothing is held."""
    if "://" in folder:
        yield
        return
    made, path = not os.path.exists(folder), os.path.join(folder, lock)
    try:
        with folder_lock(path, f"{flag} {folder}: another `psdclip {command}` ({{holder}}) is writing this {what}; "
                               f"wait for it to finish, or use another {flag}"):
            yield
    finally:
        with contextlib.suppress(OSError):
            if made and os.listdir(folder) == [lock]:
                os.remove(path)
                os.rmdir(folder)
