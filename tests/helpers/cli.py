"""Run `psdclip` as a user would: `psdclip()` in a subprocess (the installed console script), `cli()` in this
process through the same entry point (`psdclip.workflows.cli.main`: argument parsing, typed config, the
one-line error handling and exit codes), without paying a Python + torch start-up per call."""
import contextlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

BIN = os.path.dirname(sys.executable)


def psdclip(*args, check=True, timeout=600, **kw):
    r = subprocess.run([os.path.join(BIN, "psdclip"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def cli(*args, check=True):
    """`psdclip ARGS` in-process; returns (returncode, stdout, stderr) like subprocess.run. A traceback
    that would reach the user's terminal (an exception main() does not turn into a one-line error) is
    caught and returned in stderr with returncode 1, so tests assert on it exactly as on a subprocess."""
    from psdclip.workflows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors and --help
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception:  # what a user would see as a traceback
            import traceback

            traceback.print_exc()
            rc = 1
    r = SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r
