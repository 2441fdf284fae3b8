"""The build's watch on its download tasks: a build whose tasks stop writing rows is not left waiting for ever.

A download task can stop without failing: a worker process deadlocked while starting img2dataset's thread pool
(seen once: the pool's new thread never signalled that it started while the worker's event loop sat in a GC
callback), or frozen by the operating system. The task's future then never completes and the client waited
with no output. StallWatch is told, every poll, how many rows the build has done (finished shards plus what
the tasks in flight have written); when that number has not moved for --stall-timeout seconds:

- on our LocalCluster, the worker processes holding the stuck shards are killed; their nannies start new ones,
  the scheduler runs the shards again, and the stuck tasks' partial work folders are removed. A shard stuck a
  second time stops the build;
- on a --dask-scheduler cluster (not ours to restart), the build stops at once.

Stopping is one line naming the shards; what was written before is kept and the same command resumes.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import time

from ..core import logs
from ..core.errors import PsdclipError

log = logs.get(__name__, "[psdclip data build] ")

def local_nannies(client) -> dict | None:
    """{worker address: nanny} of the client's own LocalCluster; None for a cluster we were given (a scheduler
    address), whose workers are not ours to restart."""
    from dask.distributed import LocalCluster

    cluster = getattr(client, "cluster", None)
    if not isinstance(cluster, LocalCluster):
        return None
    return {n.worker_address: n for n in list(cluster.workers.values()) if n.worker_address}


class StallWatch:
    """check(rows_done) after every poll of the download futures (see the module's docstring)."""

    def __init__(self, client, futures: dict, timeout: float, work_dir: str | None):
        self.client, self.futures, self.timeout, self.work_dir = client, futures, timeout, work_dir
        self.shard_of = {f.key: shard for f, shard in futures.items()}  # the download tasks' keys -> shard
        self.restarted: set[int] = set()
        self.seen, self.since = None, time.monotonic()

    def check(self, rows_done: int, pending) -> None:
        """rows_done: the build's rows so far; pending: the futures not finished yet."""
        if not self.timeout:
            return
        now = time.monotonic()
        if rows_done != self.seen:
            self.seen, self.since = rows_done, now
            return
        if now - self.since < self.timeout:
            return
        stuck = self._started(self._stuck())
        nannies = local_nannies(self.client)
        if not stuck:
            workers = len(self.client.scheduler_info().get("workers", {}))
            self._stop(sorted(self.futures[f] for f in pending),
                       f"no download task ran for {self.timeout:g} s on the cluster's {workers} worker(s)")
        again = sorted(s for s in stuck if s in self.restarted)
        if nannies is None:
            self._stop(sorted(stuck), f"wrote no row for {self.timeout:g} s (a --dask-scheduler cluster: psdclip does "
                                      f"not restart its workers; look at worker {sorted(set(stuck.values()))[0]})")
        if again:
            self._stop(again, f"wrote no row for {self.timeout:g} s, again after its worker process was restarted")
        for addr in sorted(set(stuck.values())):
            shards = sorted(s for s, a in stuck.items() if a == addr)
            nanny = nannies.get(addr)
            leftovers = [p for s in shards for p in self._work_folders(s)]
            log.warning(f"download: shard(s) {', '.join(f'{s:05d}' for s in shards)} wrote no row for "
                        f"{self.timeout:g} s; restarting worker process {getattr(nanny, 'pid', None)} ({addr}) and "
                        f"running them again (once)")
            if nanny is not None and nanny.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(nanny.pid, signal.SIGKILL)  # its nanny starts a new one; the scheduler reruns the task
            for path in leftovers:  # the killed task's partial shard: a rerun starts the shard afresh
                shutil.rmtree(path, ignore_errors=True)
            self.restarted.update(shards)
        self.since = time.monotonic()

    def _stuck(self) -> dict[int, str]:
        """{shard: worker address} of our download tasks the scheduler has running now."""
        stuck = {}
        for addr, keys in self.client.processing().items():
            for key in map(str, keys):
                if key in self.shard_of:
                    stuck[self.shard_of[key]] = addr
        return stuck

    def _started(self, stuck: dict[int, str]) -> dict[int, str]:
        """Of the shards the scheduler has given to workers (a worker is handed more than it runs at once), those
        begun: they have a work folder. Where that cannot be seen (a dataset on an object store works in the
        worker's temporary folder), or none has one (a worker that hung before it began), all of them."""
        begun = {s: a for s, a in stuck.items() if self._work_folders(s)}
        return begun or stuck

    def _work_folders(self, shard: int) -> list[str]:
        """The shard's download work folders (download_partition's WORK = _work/NNNNN-RANDOM); none known for a
        dataset on an object store."""
        return glob.glob(os.path.join(self.work_dir, f"{shard:05d}-*")) if self.work_dir else []

    def _stop(self, shards: list[int], why: str):
        with contextlib.suppress(Exception):
            self.client.cancel(list(self.futures))
        names = ", ".join(f"{s:05d}" for s in shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        raise PsdclipError(f"download stalled: shard(s) {names} {why}; what was written is kept: rerun the same "
                           f"command to resume (--stall-timeout sets the wait)")
