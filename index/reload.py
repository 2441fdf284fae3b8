"""How the processes of `psdclip serve --workers N` agree on index reloads, through a run folder they share."""
from __future__ import annotations

import json
import os
import time

from ..core.io import write_json

RUN_DIR = "PSDCLIP_SERVE_RUNDIR"  # set by `psdclip serve --workers N` for its worker processes
FAILED = "failed.json"  # in the run folder: why a worker could not start


def worker_slot(folder: str) -> int:
    """This worker's number (0, 1, ... in start order), from a counter in the run folder under a file lock: what a
    worker's GPU is chosen by."""
    import fcntl

    with open(os.path.join(folder, "lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(folder, "slots")
        try:
            with open(path, encoding="utf-8") as f:
                slot = int(f.read() or 0)
        except (FileNotFoundError, ValueError):
            slot = 0
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(slot + 1))
    return slot


class Workers:
    """How the processes of `psdclip serve --workers N` agree on reloads, through a run folder they share:
    generations.json (index name -> reload generation; a worker that reloads bumps it under a file lock) and
    acks/PID.json (the generations each live worker has loaded). Every worker polls generations.json and reloads
    an index whose generation moved; the worker that took /admin/reload answers once every worker has it."""

    def __init__(self, folder: str, count: int):
        self.folder, self.count = folder, count
        self.acks = os.path.join(folder, "acks")
        os.makedirs(self.acks, exist_ok=True)
        self.seen = self.generations()
        self.ack()

    def generations(self) -> dict:
        try:
            with open(os.path.join(self.folder, "generations.json"), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def ack(self) -> None:
        write_json(os.path.join(self.acks, f"{os.getpid()}.json"), self.seen, indent=0)

    def bump(self, name: str) -> int:
        """A new generation of `name` (this worker has loaded it)."""
        import fcntl

        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gens = self.generations()
            gens[name] = int(gens.get(name, 0)) + 1
            write_json(os.path.join(self.folder, "generations.json"), gens, indent=0)
        self.seen[name] = gens[name]
        self.ack()
        return gens[name]

    def moved(self) -> dict:
        """name -> generation, for the indices another worker reloaded since this one last looked."""
        return {n: g for n, g in self.generations().items() if g > self.seen.get(n, 0)}

    def loaded(self, name: str, gen: int) -> int:
        """How many live workers have loaded generation `gen` of `name` (or a later one)."""
        n = 0
        for entry in os.listdir(self.acks):
            pid = entry[:-len(".json")]
            if not entry.endswith(".json") or not pid.isdigit():  # (not a file being written)
                continue
            try:
                os.kill(int(pid), 0)
                with open(os.path.join(self.acks, entry), encoding="utf-8") as f:
                    n += int(json.load(f).get(name, 0)) >= gen
            except (OSError, ValueError):
                continue
        return n

    def wait(self, name: str, gen: int, timeout: float = 300.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.loaded(name, gen)) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return n
