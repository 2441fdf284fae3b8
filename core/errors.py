"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class PsdclipError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(PsdclipError):
    """An input file (URL list, dataset, config) is missing, malformed or inconsistent."""


class DiskFullError(PsdclipError):
    """The disk (or quota) ran out while writing: what was written before is intact, the same command resumes."""


NO_SPACE = (28, 122)  # ENOSPC, EDQUOT


def is_disk_full(err: BaseException) -> bool:
    """An OSError of a full disk or quota, or the RuntimeError torch and faiss make of one (torch's zip writer
    raises its own error while handling the OSError: the chain of causes is searched)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in NO_SPACE):
            return True
        text = str(err)
        if isinstance(err, RuntimeError) and ("No space left" in text or "file write failed" in text
                                              or "Disk quota exceeded" in text):
            return True
        if isinstance(err, OSError) and err.errno is None and " requested and " in text and text.endswith(" written"):
            return True  # numpy's short write (ndarray.tofile): the file system took less than it was given
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full(path: str) -> DiskFullError:
    """The one line for a full disk at `path`: the folder, the space free there now, what to do."""
    import os
    import shutil

    folder = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else os.path.abspath(path)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free there"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{folder}: no space left on the device ({free}); free some space (or point the output "
                         f"elsewhere) and rerun the same command: what was written before is intact")

