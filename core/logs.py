"""One logging style for psdclip: every module logs to `logging.getLogger(__name__)` (the `psdclip.*`
hierarchy; `logs.get(__name__, prefix)` adds the stage's prefix such as "[sweep] "), and the CLI configures it
once (`setup`, from `psdclip --quiet` / `--verbose`). Messages go to the *current* sys.stderr as written, one
line each; child processes (sweep runs, torchrun ranks) inherit the level through PSDCLIP_LOG_LEVEL.
Progress bars (tqdm) are not log messages and stay as they are."""
from __future__ import annotations

import logging
import os
import sys

ROOT = "psdclip"
ENV = "PSDCLIP_LOG_LEVEL"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a message is emitted (a test's capture, a redirected stream)."""

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)


class _Prefixed(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['prefix']}{msg}", kwargs


def get(name: str, prefix: str = "") -> logging.LoggerAdapter:
    return _Prefixed(logging.getLogger(name), {"prefix": prefix})


def setup(level: str | int | None = None) -> None:
    """Configure the psdclip loggers once per process (again: replaces the handler). Level: the argument, else
    $PSDCLIP_LOG_LEVEL, else INFO; exported so that child processes log at the same level."""
    level = level or os.environ.get(ENV) or "INFO"
    level = logging.getLevelName(level) if isinstance(level, str) else level
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    os.environ[ENV] = logging.getLevelName(level)
