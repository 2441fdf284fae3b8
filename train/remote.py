"""--remote-sync URL (open_clip's flag): a run's checkpoints, metrics and plots copied to any fsspec URL (s3://,
gs://, another disk) as they are written, so that a job whose machine goes away can go on from them elsewhere.

Layout under URL: the run folder's own (checkpoints/step_NNNNNN.pt, checkpoints/latest, metrics.jsonl,
config.yaml, config_history.jsonl, plots/*.png). Each upload goes to a temporary name and is moved into place, and
checkpoints/latest, which names the newest complete checkpoint, is written last: an interrupted upload never
leaves a partial "latest". Uploads run on rank 0's background checkpoint writer (never in a training step); one
that fails is a warning, and the next checkpoint's sync uploads whatever is still missing. Remote checkpoints
beyond --keep are deleted like local ones.

A run started with an --out that has no checkpoint (a new machine) and the same --remote-sync first downloads the
remote run (its latest checkpoint and its metrics), on the first local rank of every node, then resumes from it
as from a local checkpoint.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import uuid

from ..core.errors import InputError
from .checkpoint import list_checkpoints

log = logging.getLogger("psdclip.train")

FILES = ("metrics.jsonl", "config.yaml", "config_history.jsonl")
_STEP = re.compile(r"step_(\d+)\.pt")


class RemoteSync:
    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.fs.makedirs(posixpath.join(self.root, "checkpoints"), exist_ok=True)
        except Exception as err:  # pylint: disable=broad-except  (unknown protocol, no credentials, no such bucket)
            raise InputError(f"--remote-sync {url}: cannot use it ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})") from None

    def _remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def _put(self, local: str, rel: str) -> None:
        """One file, to a temporary name first, then moved into place."""
        target = self._remote(rel)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.put_file(local, tmp)
        self.fs.mv(tmp, target)

    def push(self, out: str, keep: int, plots: bool = True) -> None:
        """Upload what is missing or changed of the run folder `out` (the plots when they were drawn again); `latest`
        last. Warns instead of raising."""
        try:
            self._push(out, keep, plots)
        except Exception as err:  # pylint: disable=broad-except  (a network or store error must not end training)
            log.warning(f"psdclip: warning: --remote-sync {self.url}: upload failed ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); the next checkpoint's sync uploads what is missing")

    def _push(self, out: str, keep: int, with_plots: bool) -> None:
        ckpt_dir = os.path.join(out, "checkpoints")
        local = [os.path.basename(p) for p in list_checkpoints(ckpt_dir)]
        remote = set(self._names("checkpoints"))
        for name in sorted(n for n in remote if ".tmp-" in n):  # an upload cut short (one run syncs at a time)
            self.fs.rm(self._remote(f"checkpoints/{name}"))
        remote = {n for n in remote if ".tmp-" not in n}
        for name in local:
            if name not in remote:
                self._put(os.path.join(ckpt_dir, name), f"checkpoints/{name}")
        for name in FILES:
            if os.path.isfile(os.path.join(out, name)):
                self._put(os.path.join(out, name), name)
        plots = os.path.join(out, "plots")
        if with_plots and os.path.isdir(plots):
            for name in sorted(os.listdir(plots)):
                if name.endswith(".png"):
                    self._put(os.path.join(plots, name), f"plots/{name}")
        if local:
            with self.fs.open(self._remote("checkpoints/latest"), "w") as f:  # one small object: all or nothing
                f.write(local[-1])
        steps = sorted((n for n in remote | set(local) if _STEP.fullmatch(n)), key=lambda n: int(_STEP.fullmatch(n)[1]))
        for name in steps[:-keep]:  # --keep over the remote copy: the newest of what either side holds
            if name in remote:
                self.fs.rm(self._remote(f"checkpoints/{name}"))

    def _names(self, rel: str) -> list[str]:
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._remote(rel), detail=False)]
        except FileNotFoundError:
            return []

    def latest(self) -> str | None:
        try:
            with self.fs.open(self._remote("checkpoints/latest"), "r") as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return name if name and self.fs.exists(self._remote(f"checkpoints/{name}")) else None

    def pull(self, out: str) -> str | None:
        """Into a run folder without checkpoints: the remote run's latest checkpoint and its metrics. Returns the
        checkpoint's name, or None when the remote has none."""
        name = self.latest()
        if name is None:
            return None
        ckpt_dir = os.path.join(out, "checkpoints")
        os.makedirs(ckpt_dir, exist_ok=True)
        for rel, local in ((f"checkpoints/{name}", os.path.join(ckpt_dir, name)),
                           *((f, os.path.join(out, f)) for f in FILES if f != "config.yaml")):
            if not self.fs.exists(self._remote(rel)):
                continue
            tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"  # a download cut short is cleared as a partial file
            self.fs.get_file(self._remote(rel), tmp)
            os.replace(tmp, local)
        log.info(f"psdclip: resuming from the remote copy {self.url}/checkpoints/{name}")
        return name
