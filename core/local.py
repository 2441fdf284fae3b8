"""Local images under a root the user names (`psdclip data build --local-root DIR`): the one resolver of a list's
local path or file:// URL to a file inside DIR, and the one reader of such a file. Nothing outside DIR is read: a
path, `..` or symlink that leads out of it is refused with the reason (checked when the list is cleaned and again,
on the resolved path opened without following links, when the file is read), and a FIFO, device or directory is
never opened for reading."""
from __future__ import annotations

import errno
import io
import os
import stat
import urllib.parse

MAX_FILE_BYTES = 256 * 1024 * 1024  # a local "image" larger than this is refused unread (a web image is far smaller)


def is_local(url: str) -> bool:
    """A file:// URL or a path (no scheme, or a one-letter one: a Windows drive)."""
    if not isinstance(url, str) or not url:
        return False
    head = url.split(":", 1)[0] if ":" in url else ""
    return url.lower().startswith("file:") or not head or len(head) == 1 or "/" in head


def resolve(url: str, root: str) -> tuple[str | None, str | None]:
    """(file:// URL of the resolved file inside root, None) or (None, why it is refused)."""
    if url.lower().startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            return None, f"file URL names a host ({parts.netloc}): only local files are read"
        path = urllib.parse.unquote(parts.path)
    else:
        path = url
    if "\x00" in path:
        return None, "a NUL byte in the path"
    top = os.path.realpath(root)
    full = os.path.realpath(os.path.join(top, path) if not os.path.isabs(path) else path)
    if os.path.commonpath([top, full]) != top:
        how = "a symlink leads" if _has_link(top, path) else ("its .. leads" if ".." in path.split("/") else
                                                                 "the path is")
        return None, f"outside --local-root {root} ({how} out of it): refused, never read"
    return "file://" + urllib.parse.quote(full), None


def _has_link(top: str, path: str) -> bool:
    here = top
    for part in [p for p in path.split("/") if p not in ("", ".")]:
        here = os.path.join(here, part)
        if os.path.islink(here):
            return True
    return False


def read(url: str, root: str, limit: int = MAX_FILE_BYTES) -> tuple[io.BytesIO | None, str | None]:
    """(the file's bytes, None) or (None, an error message whose first words name the kind: "file not found",
    "permission denied", "not a regular file", "outside --local-root", "file too large")."""
    full, why = resolve(url, root)
    if why:
        return None, why
    path = urllib.parse.unquote(urllib.parse.urlsplit(full).path)
    try:  # the resolved path, its last component not followed (a file swapped for a link since is refused)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, "file not found"
    except PermissionError:
        return None, "permission denied: the file cannot be read"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "outside --local-root: the file became a symlink; refused, never read"
        return None, f"file cannot be opened ({err.strerror or err})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a socket or other"
            return None, f"not a regular file ({kind}): never read"
        if st.st_size > limit:
            return None, f"file too large ({st.st_size:,} bytes, over {limit:,})"
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(limit + 1)
        if len(data) > limit:
            return None, f"file too large (over {limit:,} bytes)"
        return io.BytesIO(data), None
    except PermissionError:
        return None, "permission denied: the file cannot be read"
    except OSError as err:
        return None, f"file cannot be read ({err.strerror or err})"
    finally:
        if fd >= 0:
            os.close(fd)
