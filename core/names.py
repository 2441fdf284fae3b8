"""The one rule for names a user gives that become a file or folder name inside something (--name of `data score`
and `data subset`, a sweep's method names, a service's index names): one path component of letters, digits, '-',
'_' and '.', not starting with '.', at most 100 characters. `../manifest`, `a/b`, `.hidden` and `..` are refused
with one line, before anything is written."""
from __future__ import annotations

import re

from .errors import InputError

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def check_name(flag: str, name: str) -> str:
    """`name` when it is a safe single path component; else an InputError naming `flag` and the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"{flag} {name!r}: a name is letters, digits, '-', '_' and '.' (not first), at most 100 "
                         f"characters: one folder or file name, no path")
    return name
