"""A Dask worker plugin for our own LocalCluster (build.dask_client), in a module of its own: importing it imports
distributed, which a command that starts no cluster need not pay for."""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class NoGCDiagnosis(WorkerPlugin):
    """Turns off distributed's GC diagnosis in a worker: a gc callback every worker installs at start, which times
    and logs each full collection. Nobody reads it here, and a worker once deadlocked starting a download's thread
    pool while its event loop sat in that callback (see build.dask_client and stall.py). Set up again on every
    worker a nanny restarts."""
    name = "psdclip-no-gc-diagnosis"

    def setup(self, worker):  # pylint: disable=unused-argument
        from distributed.gc import disable_gc_diagnosis

        disable_gc_diagnosis(force=True)
