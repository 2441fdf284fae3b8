"""Where a dataset lives: a local folder, or an fsspec URL (s3://bucket/prefix, gs://, ...) so that Dask workers on
other machines need no shared POSIX mount.

Every path of the dataset folder goes through these functions. A local path keeps POSIX semantics (fsync, then
rename: a reader sees a whole file or none of it; a folder renamed into place exists whole or not at all). On an
object store a file is one object, written whole by one upload (a reader sees all of it or none of it), folders are
prefixes (an empty folder is kept by a hidden `.keep` object, as readers test for folders), a folder that must
appear whole is written in place with its commit file (e.g. an ingest's inputs.json) last, so that a reader never
takes a partial folder for a whole one, and listings are never cached (workers write what the client lists).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import shutil
import tempfile
import uuid

from .errors import disk_full, is_disk_full

KEEP = ".keep"


def is_remote(path: str) -> bool:
    """An fsspec URL other than file:// (s3://, gs://, memory://, ...)."""
    head, sep, _ = str(path).partition("://")
    return bool(sep) and head not in ("file", "local") and "/" not in head


def _fs(path: str):
    import fsspec

    protocol = str(path).split("://", 1)[0]
    # a new instance per call would be costly (credentials, connection pools); listings are never cached
    return fsspec.filesystem(protocol, use_listings_cache=False)


def fs_path(path: str) -> tuple:
    """(fsspec file system, path in it) of a remote path."""
    fs = _fs(path)
    return fs, fs._strip_protocol(path)  # pylint: disable=protected-access


def check_writable(folder: str) -> None:
    """Raise what writing in `folder` of an object store raises (no bucket, no credentials, access denied), by
    writing and removing a small hidden object; nothing for a local folder (its errors name the path already)."""
    if not is_remote(folder):
        return
    fs, p = fs_path(folder)
    probe = posixpath.join(p, f".psdclip-probe-{uuid.uuid4().hex[:8]}")
    fs.pipe_file(probe, b"")
    fs.rm_file(probe)


def resolve(root: str) -> str:
    """A dataset root as every stage names it: a URL without a trailing slash, or an absolute local path."""
    root = str(root)
    if root.startswith("file://"):
        root = root[len("file://"):]
    return root.rstrip("/") if is_remote(root) else os.path.abspath(root)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = fs_path(path)
    return fs.exists(p)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = fs_path(path)
    return fs.isfile(p)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = fs_path(path)
    return fs.isdir(p)


def listdir(path: str) -> list[str]:
    """The names in a folder ([] when it does not exist); on an object store without the `.keep` marker."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, p = fs_path(path)
    try:
        names = [posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)]
    except FileNotFoundError:
        return []
    return [n for n in names if n and n != KEEP]


def sizes(folder: str, pattern: str) -> dict[str, int]:
    """{path: bytes} of the files in `folder` whose names match `pattern` (one listing on an object store)."""
    if not is_remote(folder):
        return {p: os.path.getsize(p) for p in glob(folder, pattern)}
    fs, p = fs_path(folder)
    try:
        entries = fs.ls(p, detail=True)
    except FileNotFoundError:
        return {}
    names = {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
             if e.get("type") != "directory"}
    return {join(folder, n): size for n, size in names.items() if fnmatch.fnmatch(n, pattern)}


def glob(folder: str, pattern: str) -> list[str]:
    """The paths in `folder` whose names match `pattern` (one level), sorted."""
    if is_remote(folder):
        return sorted(sizes(folder, pattern))
    import glob as _glob

    return sorted(_glob.glob(os.path.join(folder, pattern)))


def makedirs(path: str) -> None:
    """A folder (and its parents); on an object store a `.keep` object, so the empty folder is seen."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = fs_path(path)
    keep = posixpath.join(p, KEEP)
    if not fs.exists(keep):
        fs.pipe_file(keep, b"")


def ensure_parent(path: str) -> None:
    """The folder a file is about to be written in (object stores need none)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def remove(path: str) -> None:
    """Remove a file; no error when it is gone."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, p = fs_path(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(p)


def rmtree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = fs_path(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def open_file(path: str, mode: str = "rb", **kw):
    if not is_remote(path):
        return open(path, mode, **kw)  # pylint: disable=unspecified-encoding
    fs, p = fs_path(path)
    return fs.open(p, mode, **kw)


def tmp_name(path: str, hidden: bool) -> str:
    head, tail = os.path.split(path) if not is_remote(path) else posixpath.split(path)
    tag = uuid.uuid4().hex[:8]
    return join(head, f".{tail}.tmp-{tag}") if hidden else f"{path}.tmp-{tag}"


def put(local: str, path: str) -> None:
    """Publish a finished local file as `path` whole: fsync, then rename (same file system), or one upload."""
    if not is_remote(path):
        with open(local, "rb") as f:
            os.fsync(f.fileno())
        os.replace(local, path)
        return
    fs, p = fs_path(path)
    fs.put_file(local, p)


@contextlib.contextmanager
def atomic_path(path: str, hidden: bool = False):
    """Yields a temporary local path; what the block writes there replaces `path` whole when the block ends (fsync
    and rename beside it; on an object store one upload), or is removed if it fails. For writers that take a path.
    hidden: the local temporary name starts with a dot (skipped by pyarrow.dataset and DuckDB readers)."""
    if not is_remote(path):
        tmp = tmp_name(path, hidden)
    else:
        fd, tmp = tempfile.mkstemp(prefix="psdclip-", suffix="-" + posixpath.basename(path))
        os.close(fd)
    try:
        yield tmp
        put(tmp, path)
    except (OSError, RuntimeError) as err:  # the one writer every stage uses: a full disk is one line

        if is_disk_full(err):
            raise disk_full(path if not is_remote(path) else tmp) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def fetch(path: str, local: str) -> None:
    """A local copy of a file (a hard link when both are local on one file system)."""
    if is_remote(path):
        fs, p = fs_path(path)
        fs.get_file(p, local)
        return
    try:
        os.link(path, local)
    except OSError:  # another file system
        shutil.copyfile(path, local)


def copy(src: str, dst: str) -> None:
    """dst becomes a whole copy of src (both in the same store)."""
    if not is_remote(dst):
        with atomic_path(dst, hidden=True) as tmp:
            shutil.copyfile(src, tmp)
        return
    fs, p = fs_path(src)
    fs.copy(p, fs_path(dst)[1])


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = fs_path(path)
    return int(fs.size(p))


def staging_dir(final: str) -> str:
    """Where to write a folder that becomes `final` by publish_dir: a temporary folder beside it (local), or
    `final` itself on an object store, where the folder's commit file (written last) makes it whole and copying
    its objects would cost a request each; what a crashed earlier attempt left there is removed first."""
    if not is_remote(final):
        return tmp_name(final, False)
    rmtree(final)
    return final


def publish_dir(tmp: str, final: str, last: str | None = None) -> None:
    """The folder `tmp` (complete) becomes `final` (which must not exist whole). Local: one rename. Object store:
    what a crashed earlier publish left at `final` is removed, then every object is copied (the `last` file after
    all others: readers take the folder as whole once it is there) and `tmp` removed."""
    if not is_remote(final):
        os.replace(tmp, final)
        return
    if tmp == final:  # written in place (staging_dir): its commit file is already the last thing written
        return
    fs, src = fs_path(tmp)
    dst = fs_path(final)[1]
    rmtree(final)
    files = sorted(fs.find(src))
    first = [f for f in files if posixpath.basename(f) != last]
    if first:
        fs.copy(first, [dst + f[len(src):] for f in first])  # one batch of concurrent copies
    for f in files:
        if posixpath.basename(f) == last:
            fs.copy(f, dst + f[len(src):])
    fs.rm(src, recursive=True)


def arrow_filesystem(path: str):
    """(pyarrow file system or None, path) for pyarrow readers that take a file system (pyarrow.dataset)."""
    if not is_remote(path):
        return None, path
    import pyarrow.fs as pafs

    fs, p = fs_path(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p
