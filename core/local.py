"""Local images under a root the user names (`psdclip data build --local-root DIR`): the one resolver of a list's
local path or file:// URL to a file inside DIR, and the one reader of such a file. Nothing outside DIR is read: a
path, `..` or symlink that leads out of it is refused with the reason (checked when the list is cleaned, by path),
and the file is opened beneath DIR by file descriptors, component by component, so that a folder swapped for a link
between that check and the read cannot lead out: the kernel's openat2(RESOLVE_BENEATH) where it has it (a symlink
that stays inside DIR is followed, one that leads out is refused), else a walk of directory fds that follows no
link at all. A FIFO, device or directory is never opened for reading; any error ends the row, never the shard."""
from __future__ import annotations

import errno
import io
import os
import stat
import sys
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
    try:
        top = os.path.realpath(root)
        full = os.path.realpath(os.path.join(top, path) if not os.path.isabs(path) else path)
    except (OSError, ValueError) as err:  # a link loop, or a folder swapped while it is resolved
        return None, f"the path cannot be resolved ({getattr(err, 'strerror', None) or err}): refused, never read"
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
    return read_beneath(urllib.parse.unquote(urllib.parse.urlsplit(full).path), root, limit)


def read_beneath(path: str, root: str, limit: int = MAX_FILE_BYTES) -> tuple[io.BytesIO | None, str | None]:
    """Read the resolved `path` (inside root when it was checked) opened beneath root by file descriptors: what a
    folder swapped for a link since the check points to is refused, never read."""
    try:
        top = os.path.realpath(root)
        rel = os.path.relpath(path, top)
    except (OSError, ValueError) as err:
        return None, f"the path cannot be resolved ({getattr(err, 'strerror', None) or err}): refused, never read"
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None, f"outside --local-root {root}: refused, never read"
    try:
        fd = _open_beneath(top, rel)
    except FileNotFoundError:
        return None, "file not found"
    except PermissionError:
        return None, "permission denied: the file cannot be read"
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            return None, (f"outside --local-root {root}: a link on the way leads out of it (or the folder changed "
                          f"since it was checked); refused, never read")
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


try:  # (a Python whose ctypes cannot load, e.g. run by another user than its installer's, walks the fds instead)
    import ctypes
except ImportError:
    ctypes = None

FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_RESOLVE_BENEATH = 0x08  # linux/openat2.h
_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}.get(os.uname().machine)  # the syscall's number
_have_openat2 = [ctypes is not None and _OPENAT2 is not None and sys.platform == "linux"]


def _open_beneath(top: str, rel: str) -> int:
    """A file descriptor of top/rel opened beneath top (see the module's docstring); OSError as open raises it."""
    root = os.open(top, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        if _have_openat2[0]:
            try:
                return _openat2(root, rel, FILE_FLAGS | getattr(os, "O_NOFOLLOW", 0), _RESOLVE_BENEATH)
            except OSError as err:
                if err.errno not in (errno.ENOSYS, errno.EPERM):  # (EPERM: a seccomp filter that forbids it)
                    raise
                _have_openat2[0] = False
        return _walk_beneath(root, rel)
    finally:
        os.close(root)


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    class OpenHow(ctypes.Structure):  # struct open_how
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = OpenHow(flags, 0, resolve)
    fd = libc.syscall(_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk_beneath(root: int, rel: str) -> int:
    """Open rel from the directory fd `root` one component at a time, following no link (O_NOFOLLOW on every
    component: a link anywhere on the way is ELOOP or ENOTDIR)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EXDEV, "not beneath the root", rel)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    here = root
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow | getattr(os, "O_CLOEXEC", 0), dir_fd=here)
            if here != root:
                os.close(here)
            here = nxt
        return os.open(parts[-1], FILE_FLAGS | nofollow, dir_fd=here)
    finally:
        if here != root:
            os.close(here)
