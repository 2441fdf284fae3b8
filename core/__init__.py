"""psdclip.core: the shared base that every stage uses and that uses no stage.

    errors.py   the errors a user can act on (printed as one line by the CLI)
    storage.py  paths on a local disk or any fsspec store; atomic files and folders
    io.py       atomic writes and the JSON / Parquet / Arrow helpers every stage reads and writes with
    logs.py     one logging style (the psdclip.* loggers), configured once by the CLI
"""
from .errors import InputError, PsdclipError

__all__ = ["InputError", "PsdclipError"]
