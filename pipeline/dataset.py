"""The build's own state of a dataset directory: ingests, shard plans and finished shards (the dataset's figures:
stats.py). The public layout (what readers use) is format.py; its reader, reader.py.

    DATASET/
      dataset.json  manifest/  stats.json  shards/  subsets/            the contract (format.py)
      _state/ingests/<id>/shards/NNNNN.arrow, shards.json, unsharded/, keys/, inputs.json   what each ingest planned
      _state/results/<shard>.parquet                                    one per finished shard
      _work/                                                            scratch, cleared on every run

Every file is replaced atomically. DATASET may be a local folder or an fsspec URL (s3://...): every path goes
through core.storage.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import storage
from ..core.io import atomic_path, read_feather, read_json, write_json
from ..core.io import read_parquet as _read_parquet
from .format import MANIFEST_COLUMNS, MANIFEST_SCHEMA, DatasetLayout
from .status import PENDING

J = storage.join


class Layout(DatasetLayout):
    """A dataset directory as its build sees it: the public layout plus the build's state folders."""

    def __init__(self, root: str):
        super().__init__(root)
        self.state = J(self.root, "_state")
        self.ingests = J(self.state, "ingests")
        self.results = J(self.state, "results")
        self.work = J(self.root, "_work")
        self._plans: dict[int, pd.DataFrame] = {}

    def create(self) -> None:
        for d in (self.shards, self.subsets, self.ingests, self.results):
            storage.makedirs(d)

    def clear_scratch(self) -> None:
        """Remove what an interrupted run left: the work folder and half-written temporary files."""
        storage.rmtree(self.work)
        if storage.is_remote(self.root):  # objects are uploaded whole: no temporary files; half-published ingests
            for name in storage.listdir(self.ingests):
                folder = J(self.ingests, name)
                if ".tmp-" in name or (name.isdigit() and not storage.exists(J(folder, "inputs.json"))):
                    storage.rmtree(folder)
            return
        import shutil

        for pattern in ("*.tmp-*", "shards/*.tmp-*", "subsets/*.tmp-*", "_state/results/*.tmp-*",
                        "_state/ingests/*.tmp-*", "_state/ingests/*/*.tmp-*", "_state/ingests/*/shards/*.tmp-*",
                        "manifest/.*.tmp-*"):
            for path in glob.glob(J(self.root, pattern)):
                if storage.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)

    def result_path(self, shard: int) -> str:
        return J(self.results, f"{shard:05d}.parquet")

    # ingests ---------------------------------------------------------------------------------------
    def ingest_ids(self) -> list[int]:
        names = sorted(int(d) for d in storage.listdir(self.ingests) if d.isdigit())
        if storage.is_remote(self.root):  # an ingest is whole once its inputs.json (copied last) is there
            names = [i for i in names if storage.exists(J(self.ingests, f"{i:05d}", "inputs.json"))]
        return names

    def load_plan(self, ingest: int, columns=None) -> pd.DataFrame:
        """An ingest's plan (a copy; plans never change once written, so each is read from disk once): its
        unsharded/ manifest parts (rows that reach no shard) and its shard input files; for older ingests an
        unsharded.parquet and shard input files, or one plan.parquet."""
        plan = self._plans.get(ingest)
        if plan is None:
            folder = J(self.ingests, f"{ingest:05d}")
            if storage.isfile(J(folder, "plan.parquet")):
                plan = _read_parquet(J(folder, "plan.parquet"))
            elif storage.isdir(J(folder, "unsharded")):  # written by the partitioned ingest
                parts = [_unsharded_plan(path) for _, path in self.unsharded_manifests(ingest)]
                parts += [_read_shard_input(folder, int(shard)) for shard in read_json(J(folder, "shards.json"))]
                plan = pd.concat(parts, ignore_index=True)[PLAN_COLUMNS] if parts else pd.DataFrame(
                    {c: pd.Series(dtype=object) for c in PLAN_COLUMNS})
            else:
                parts = [_read_parquet(J(folder, "unsharded.parquet"))]
                parts = [p for p in parts if len(p)] + [_read_shard_input(folder, int(shard))
                                                        for shard in read_json(J(folder, "shards.json"))]
                plan = pd.concat(parts, ignore_index=True) if parts else _read_parquet(
                    J(folder, "unsharded.parquet"))
            for col in plan.columns:  # dictionary-encoded on disk; plain values in memory
                if isinstance(plan[col].dtype, pd.CategoricalDtype):
                    plan[col] = plan[col].astype(object)
            self._plans[ingest] = plan
        return (plan[list(columns)] if columns else plan).copy()

    def load_sharded_plan(self, ingest: int) -> pd.DataFrame:
        """The rows of an ingest's plan that reach a shard (from its shard input files alone, when it has them)."""
        folder = J(self.ingests, f"{ingest:05d}")
        if ingest in self._plans or storage.isfile(J(folder, "plan.parquet")):
            plan = self.load_plan(ingest)
            return plan[plan["shard"] >= 0]
        shards = read_json(J(folder, "shards.json"))
        if not shards:
            return self.load_plan(ingest).iloc[:0]
        plan = pd.concat([_read_shard_input(folder, int(s)) for s in shards], ignore_index=True)
        plan["source"] = plan["source"].astype(object)
        return plan

    def unsharded_manifests(self, ingest: int) -> list[tuple[str, str]]:
        """[(name in manifest/, stored file)]: the manifest rows of an ingest that reach no shard (their statuses are
        final once planned), written with the ingest and copied into manifest/ as they are: a finalize never reads
        those rows again. A partitioned ingest has one file per bucket (_state/ingests/N/unsharded/JJJJ.parquet ->
        manifest/ingest-N-JJJJ.parquet); an older one _state/ingests/N/manifest.parquet (written at its first
        finalize if missing) -> manifest/ingest-N.parquet."""
        folder = J(self.ingests, f"{ingest:05d}")
        parts = J(folder, "unsharded")
        if storage.isdir(parts):
            return [(f"ingest-{ingest:05d}-{name}", J(parts, name)) for name in sorted(storage.listdir(parts))
                    if name.endswith(".parquet") and not name.startswith(".")]
        path = J(folder, "manifest.parquet")
        if not storage.isfile(path):
            plan = self.load_plan(ingest)
            _write_unsharded_manifest(path, plan[plan["shard"] < 0], ingest)
        return [(f"ingest-{ingest:05d}.parquet", path)]

    def load_inputs(self, ingest: int) -> dict:
        return read_json(J(self.ingests, f"{ingest:05d}", "inputs.json"))

    def planned_shards_of(self, ingest: int) -> dict[int, tuple[str, int]]:
        """shard -> (its input file, rows) of one ingest (from its shards.json)."""
        folder = J(self.ingests, f"{ingest:05d}")
        return {int(shard): (J(folder, "shards", f"{int(shard):05d}.arrow"), int(rows))
                for shard, rows in read_json(J(folder, "shards.json")).items()}

    def planned_shards(self, upgrade: bool = False) -> dict[int, tuple[str, int]]:
        """shard -> (its input file, rows) over every ingest, from the small shards.json of each: the client
        neither loads a plan nor sends rows to find and start the downloads. An ingest written before shard input
        files existed gets them with upgrade=True (a build, which holds the lock), once; readers only look."""
        out: dict[int, tuple[str, int]] = {}
        for ingest in self.ingest_ids():
            folder = J(self.ingests, f"{ingest:05d}")
            index = J(folder, "shards.json")
            if not storage.isfile(index):
                if not upgrade:
                    shards = self.load_plan(ingest, ["shard"])["shard"]
                    out.update({int(s): ("", int(n)) for s, n in shards[shards >= 0].value_counts().items()})
                    continue
                _write_shard_inputs(folder, self.load_plan(ingest))
            out.update(self.planned_shards_of(ingest))
        return out

    def done_shards(self) -> set[int]:
        return {int(os.path.basename(p).split(".")[0]) for p in storage.glob(self.results, "*.parquet")}

    def result_files(self) -> list[str]:
        return storage.glob(self.results, "*.parquet")


SHARD_INPUT_COLUMNS = ["url", "caption", "psdclip_key", "source", "source_row", "host"]


def _write_shard_inputs(folder: str, plan: pd.DataFrame) -> None:
    """FOLDER/shards/NNNNN.arrow: a shard's planned rows in download order (url, caption and psdclip_key are what
    img2dataset's Downloader reads; source, source_row and host complete the plan), and FOLDER/shards.json:
    shard -> rows, written last. One Arrow sort by (shard, order), then each shard is a zero-copy slice."""
    import pyarrow.compute as pc
    import pyarrow.feather as feather

    storage.makedirs(J(folder, "shards"))
    pending = plan[plan["shard"] >= 0]
    table = pa.table({"url": pa.array(pending["url"], pa.string()), "caption": pa.array(pending["caption"], pa.string()),
                      "psdclip_key": pa.array(pending["key"], pa.string()),
                      "source": pa.array(pending["source"].astype(str), pa.string()).dictionary_encode(),
                      "source_row": pa.array(pending["source_row"].to_numpy(np.int64)),
                      "host": pa.array(pending["host"], pa.string()),
                      "shard": pa.array(pending["shard"].to_numpy(np.int64)),
                      "order": pa.array(pending["order"].to_numpy(np.int64))})
    table = table.take(pc.sort_indices(table, [("shard", "ascending"), ("order", "ascending")]))
    shards = table.column("shard").to_numpy()
    cuts = np.flatnonzero(np.diff(shards)) + 1
    counts = {}
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(shards)]):
        if stop <= start:
            continue
        shard = int(shards[start])
        with atomic_path(J(folder, "shards", f"{shard:05d}.arrow")) as tmp:
            feather.write_feather(table.slice(start, stop - start).select(SHARD_INPUT_COLUMNS), tmp,
                                  compression="uncompressed")
        counts[str(shard)] = int(stop - start)
    write_json(J(folder, "shards.json"), counts, indent=0)


def _read_shard_input(folder: str, shard: int) -> pd.DataFrame:
    """A shard input file back as plan rows (pending, in download order)."""
    df = read_feather(J(folder, "shards", f"{shard:05d}.arrow")).to_pandas()
    df = df.rename(columns={"psdclip_key": "key"})
    df["status"], df["error"], df["shard"], df["order"] = PENDING, "", shard, np.arange(len(df), dtype=np.int64)
    return df


PLAN_COLUMNS = ["key", "url", "caption", "source", "source_row", "status", "error", "host", "shard", "order"]


def _unsharded_plan(path: str) -> pd.DataFrame:
    """Stored manifest rows that reach no shard, back as plan rows."""
    m = _read_parquet(path, columns=["key", "url", "caption", "source", "source_row", "status", "error"])
    m["host"], m["shard"], m["order"] = "", -1, -1
    return m


def write_replaced(path: str, rows: pd.DataFrame) -> None:
    """replaced.parquet of a retry ingest: (key, shard of the earlier plan), sorted by shard (a finalize task reads
    its shard's rows through the row groups' statistics)."""
    rows = rows.sort_values("shard", kind="stable")
    table = pa.table({"key": pa.array(rows["key"].astype(str), pa.string()),
                      "shard": pa.array(rows["shard"].to_numpy(np.int64))})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=65_536)


def _write_unsharded_manifest(path: str, rows: pd.DataFrame, ingest: int) -> None:
    m = rows.copy()
    m["ingest"] = ingest
    for c in ("offset", "size", "width", "height", "original_width", "original_height", "shard"):
        m[c] = pd.NA
    m["sha256"] = ""
    for c in ("status", "error", "source"):
        m[c] = m[c].astype(str)
    table = pa.Table.from_pandas(m[MANIFEST_COLUMNS].reset_index(drop=True), schema=MANIFEST_SCHEMA,
                                 preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def unfinished_shards(layout: Layout) -> tuple[int, int]:
    """(shards planned but not downloaded yet, shards planned): a build cut off before its end leaves some."""
    planned = set(layout.planned_shards())
    return len(planned - layout.done_shards()), len(planned)
