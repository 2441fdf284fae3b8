"""Run the installed `psdclip` command in a subprocess, as a user would."""
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def psdclip(*args, check=True, timeout=600, **kw):
    r = subprocess.run([os.path.join(BIN, "psdclip"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r
