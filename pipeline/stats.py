"""The dataset's figures (stats.json, `psdclip data stats`): counts per status, image sizes, shards and failing hosts,
accumulated over the manifest a record batch at a time (never a row list), and their text form."""
from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core import storage
from ..core.io import read_json

from .dataset import Layout
from .format import shard_extension, shard_format
from .reader import manifest_batches
from .status import DUPLICATE_IMAGE, SUCCESS
from .clean import hosts


SIZE_COLUMNS = ("width", "height", "original_width", "original_height")
STATS_COLUMNS = ["url", "status", "shard", "size", *SIZE_COLUMNS]


def _median(hist: collections.Counter) -> float:
    """The median of the values a histogram counts (the mean of the two middle ones for an even count)."""
    values = sorted(hist)
    cum = np.cumsum([hist[v] for v in values])
    n = int(cum[-1])
    lo = values[int(np.searchsorted(cum, (n - 1) // 2, side="right"))]
    hi = values[int(np.searchsorted(cum, n // 2, side="right"))]
    return (lo + hi) / 2


class StatsAccumulator:
    """The dataset's figures, accumulated over pieces of the manifest (a file or a record batch at a time). Its memory
    grows with the distinct statuses, image sizes (exact medians from histograms), shards and failing hosts, never
    with rows; hosts are kept for the HOST_CAP with the most failures (beyond that the host figures are approximate)."""
    HOST_CAP = 50_000

    def __init__(self):
        self.rows = self.attempted = self.image_bytes = 0
        self.counts: collections.Counter = collections.Counter()
        self.sizes = {c: collections.Counter() for c in SIZE_COLUMNS}
        self.shards: dict[int, list] = {}  # shard -> [rows, failures, Counter of failure statuses]
        self.hosts: dict[str, list] = {}  # host -> [attempted, failures, Counter of failure statuses]

    def add(self, frame: pd.DataFrame) -> "StatsAccumulator":
        self.rows += len(frame)
        status = frame["status"].astype(str)
        self.counts.update(status.value_counts().to_dict())
        ok = (status == SUCCESS).to_numpy()
        for c in SIZE_COLUMNS:
            v = frame[c].to_numpy()[ok]
            self.sizes[c].update(pd.Series(v).dropna().astype(np.int64).value_counts().to_dict())
        self.image_bytes += int(pd.Series(frame["size"].to_numpy()[ok]).dropna().sum())
        tried = frame["shard"].notna().to_numpy()
        if not tried.any():
            return self
        d = pd.DataFrame({"shard": frame["shard"].to_numpy()[tried].astype(np.int64), "status": status.to_numpy()[tried]})
        d["fail"] = ~d["status"].isin([SUCCESS, DUPLICATE_IMAGE])
        d["host"] = hosts(pa.array(frame["url"].astype(str).to_numpy()[tried], pa.string()),
                          np.ones(len(d), bool)).to_numpy(zero_copy_only=False)
        self.attempted += len(d)
        for col, table in (("shard", self.shards), ("host", self.hosts)):
            per = d.groupby(col)["fail"].agg(["size", "sum"])
            fails = d[d["fail"]].groupby([col, "status"]).size()
            for name, (n, f) in zip(per.index, per.to_numpy()):
                entry = table.setdefault(name, [0, 0, collections.Counter()])
                entry[0] += int(n)
                entry[1] += int(f)
            for (name, st), n in fails.items():
                table[name][2][st] += int(n)
        if len(self.hosts) > self.HOST_CAP:  # keep the hosts with the most failures
            keep = sorted(self.hosts.items(), key=lambda kv: (-kv[1][1], -kv[1][0]))[: self.HOST_CAP // 2]
            self.hosts = dict(keep)
        return self

    def result(self, layout: "Layout", fmt: str, top_hosts: int = 10) -> dict:
        success = int(self.counts.get(SUCCESS, 0))
        sizes = {c: ({"min": min(h), "median": _median(h), "max": max(h),
                      "mean": sum(v * n for v, n in h.items()) / sum(h.values())} if h else None)
                 for c, h in self.sizes.items()}
        shard_files = storage.sizes(layout.shards, f"*.{shard_extension(fmt)}")
        failing = [{"shard": layout.shard_name(int(s), fmt), "rows": n, "failure_rate": round(f / n, 4),
                    "top_errors": dict(c.most_common(3))}
                   for s, (n, f, c) in sorted(self.shards.items()) if f / n > 0.5]
        worst = sorted(((h, e) for h, e in self.hosts.items() if e[1]), key=lambda kv: (-kv[1][1], -kv[1][0]))
        hosts_out = [{"host": h, "attempted": n, "success": n - f, "failed": f, "statuses": dict(c.most_common())}
                     for h, (n, f, c) in worst[:top_hosts]]
        return {
            "rows": self.rows,
            "counts": dict(sorted(self.counts.items())),
            "hosts": hosts_out,
            "success": success,
            "success_rate": round(success / self.rows, 6) if self.rows else 0.0,
            "attempted": self.attempted,
            "download_success_rate": round(success / self.attempted, 6) if self.attempted else 0.0,
            "image_sizes": sizes,
            "image_bytes": self.image_bytes,
            "shard_bytes": int(sum(shard_files.values())),
            "shards": len(shard_files),
            "failing_shards": failing,
        }


def stream_stats(root: str, fmt: str | None = None) -> dict:
    """The figures of a dataset (`psdclip data stats`, the end of a build), its manifest read a batch of rows at a
    time. fmt: the shard format (default: dataset.json's)."""
    acc = StatsAccumulator()
    for frame in manifest_batches(root, STATS_COLUMNS):
        acc.add(frame)
    layout = Layout(root)
    if fmt is None:
        fmt = shard_format(read_json(layout.dataset_json) if storage.isfile(layout.dataset_json) else {})
    return acc.result(layout, fmt)


def format_stats(stats: dict) -> str:
    lines = [] if not stats.get("incomplete") else [
        f"incomplete: {stats['incomplete']['unfinished_shards']} of {stats['incomplete']['planned_shards']} planned "
        f"shard(s) not downloaded yet; rerun the same `psdclip data build` command", ""]
    lines += [f"rows {stats['rows']:,}   success {stats['success']:,} ({stats['success_rate']:.1%} of rows, "
             f"{stats['download_success_rate']:.1%} of {stats['attempted']:,} downloads)   shards {stats['shards']}   "
             f"bytes {stats['shard_bytes']:,}"]
    lines.append("")
    lines.append(f"{'status':<20}{'rows':>10}{'share':>9}")
    for k, v in sorted(stats["counts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<20}{v:>10,}{v / max(stats['rows'], 1):>9.1%}")
    sz = stats["image_sizes"]
    if sz.get("original_width"):
        ow, oh, w, h = sz["original_width"], sz["original_height"], sz["width"], sz["height"]
        lines.append("")
        lines.append(f"original size: width {ow['min']}..{ow['max']} (median {ow['median']:.0f}), "
                     f"height {oh['min']}..{oh['max']} (median {oh['median']:.0f})")
        lines.append(f"stored size:   width {w['min']}..{w['max']}, height {h['min']}..{h['max']}")
    if stats.get("hosts"):
        lines.append("")
        lines.append(f"{'failing hosts':<40}{'attempted':>10}{'failed':>9}  statuses")
        for h in stats["hosts"]:
            sts = ", ".join(f"{k} {v}" for k, v in h["statuses"].items())
            lines.append(f"{h['host'][:39]:<40}{h['attempted']:>10,}{h['failed']:>9,}  {sts}")
    for f in stats["failing_shards"]:
        errs = ", ".join(f"{k} {v}" for k, v in f["top_errors"].items())
        lines.append(f"warning: shard {f['shard']}: {f['failure_rate']:.0%} of {f['rows']} downloads failed "
                     f"(most common: {errs})")
    return "\n".join(lines)
