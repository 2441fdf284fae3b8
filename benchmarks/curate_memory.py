"""Peak memory of the curation commands as the dataset grows (issue 28: the client of every command holds O(shards)
state, DESIGN.md's scale rule), at 100k and 1M rows.

For each size N: an img2dataset webdataset folder of N rows (95% successes, each a distinct 16x16 JPEG; 5%
failed_to_download) in shards of 10,000, written here, then, each as its own `psdclip` process with its peak RSS
sampled every 0.1 s:

- `psdclip data import` (subsets 0.1,1.0);
- `psdclip data score --embeddings`: the parts (clip-retrieval's layout, 64-d random unit vectors, made_from.json for
  a stand-in checkpoint file: with --embeddings nothing is loaded or encoded) are written by this script, so the
  figure is the scores' bookkeeping, not a model's forward pass;
- `psdclip data subset --top-fraction 0.3` (the histogram threshold), `--min-score 0 --within 10pct`;
- `psdclip data subset --exclude-near EVAL`: 40 evaluation images, 10 of them the bytes of dataset samples (exact),
  10 other samples resized to 48 px and re-encoded as PNG (near), 20 unrelated; every stored image is decoded and hashed;
- `psdclip data stats`.

Goal: peak RSS at 1M / at 100k rows <= 1.5 for every command (a process holding per-row state grows 10x). The
planted copies must be found (20 excluded at each size). Memory is not a timing: this may run beside other work.

    python benchmarks/curate_memory.py [--rows 100000 1000000] [--out bench-out]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402
from pipeline_memory import peak_rss  # noqa: E402

BIN = os.path.join(os.path.dirname(sys.executable), "psdclip")
SHARD = 10_000
DIM = 64


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()  # smooth, as photographs are at this size: 4x4 random colours blown up
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((16, 16), Image.BILINEAR).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(folder: str, n: int) -> dict[str, bytes]:
    """img2dataset's webdataset output of n rows; returns the bytes of 20 successes (the plants' originals)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    plants = {}
    for s in range(0, (n + SHARD - 1) // SHARD):
        rows = []
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * SHARD, min(n, (s + 1) * SHARD)):
                key = f"{i:09d}"
                ok = i % 20 != 7
                row = {"key": key, "url": f"http://img.example.com/{i}.jpg", "caption": f"a photo number {i}",
                       "status": "success" if ok else "failed_to_download",
                       "error_message": None if ok else "HTTP Error 404: Not Found", "sha256": None,
                       "width": 16 if ok else None, "height": 16 if ok else None}
                if ok:
                    data = _jpeg(rng)
                    row["sha256"] = hashlib.sha256(data).hexdigest()
                    if i % (n // 20) == 1 and len(plants) < 20:
                        plants[key] = data
                    for ext, payload in (("jpg", data), ("txt", row["caption"].encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{s:05d}.parquet"))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": len(rows), "successes": sum(r["status"] == "success" for r in rows)}, f)
    return plants


def make_eval(folder: str, plants: dict[str, bytes]) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for j, (key, data) in enumerate(plants.items()):  # 10 exact copies, 10 near copies of 10 other samples
        if j % 2 == 0:
            with open(os.path.join(folder, f"exact-{key}.jpg"), "wb") as f:
                f.write(data)
            continue
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").resize((48, 48), Image.BICUBIC).save(os.path.join(folder, f"near-{key}.png"))
    for j in range(20):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"other{j}.png"))


def make_parts(dataset: str, emb: str, checkpoint: str) -> None:
    """Random unit vectors for every success, in the order and layout `index build` writes, recorded as made from
    `checkpoint` on this dataset."""
    from psdclip.core.io import sha256_file, write_json
    from psdclip.index.embed import MADE_FROM, parts_identity
    from psdclip.pipeline.reader import success_keys

    rng = np.random.default_rng(2)
    for d in ("img_emb", "text_emb", "metadata"):
        os.makedirs(os.path.join(emb, d), exist_ok=True)
    info = json.load(open(os.path.join(dataset, "dataset.json")))
    for s in info["shards"]:
        keys = success_keys(dataset, int(s))
        for kind, d in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            v = rng.standard_normal((len(keys), DIM)).astype(np.float32)
            v[:, 0] += 2.0  # image and caption vectors share a direction: scores spread around ~0.5
            np.save(os.path.join(emb, d, f"{kind}_{int(s):05d}.npy"),
                    (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
        pq.write_table(pa.table({"key": pa.array(keys.tolist(), pa.string())}),
                       os.path.join(emb, "metadata", f"metadata_{int(s):05d}.parquet"))
    write_json(os.path.join(emb, MADE_FROM), parts_identity(dataset, sha256_file(checkpoint)))


def measure(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS, wall seconds, stdout) of one psdclip process."""
    t = time.time()
    p = subprocess.Popen([BIN, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peaks = threading.Event(), {}
    poll = threading.Thread(target=peak_rss, args=({"p": p.pid}, stop, peaks))
    poll.start()
    out, err = p.communicate()
    stop.set()
    poll.join()
    if p.returncode:
        raise RuntimeError(f"psdclip {' '.join(cmd)} failed: {err[-2000:]}")
    return peaks.get("p", 0), time.time() - t, out


def one(n: int, out: str) -> dict:
    work = os.path.join(out, f"curate-{n}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t = time.time()
    plants = make_folder(os.path.join(work, "i2d"), n)
    make_eval(os.path.join(work, "eval"), plants)
    print(f"{n:,} rows: img2dataset folder written in {time.time() - t:.0f} s", flush=True)
    ds, emb, ckpt = (os.path.join(work, x) for x in ("ds", "emb", "stand-in-checkpoint.pt"))
    res = {"rows": n}
    res["import"] = measure(["data", "import", os.path.join(work, "i2d"), "--out", ds, "--subsets", "0.1,1.0"])
    with open(ckpt, "wb") as f:
        f.write(b"a stand-in: with --embeddings data score loads no model")
    make_parts(ds, emb, ckpt)
    res["score"] = measure(["data", "score", ds, "--checkpoint", ckpt, "--embeddings", emb, "--name", "bench"])
    res["subset top 30%"] = measure(["data", "subset", ds, "--name", "top30", "--score", "bench",
                                     "--top-fraction", "0.3"])
    res["subset min 0 within 10pct"] = measure(["data", "subset", ds, "--name", "min0", "--score", "bench",
                                                "--min-score", "0", "--within", "10pct"])
    res["subset exclude-near"] = measure(["data", "subset", ds, "--name", "clean", "--exclude-near",
                                          os.path.join(work, "eval")])
    res["stats"] = measure(["data", "stats", ds])
    doc = json.load(open(os.path.join(ds, "subsets", "clean.json")))
    res["excluded"] = (doc["exclude"]["exact"], doc["exclude"]["near"])
    gone = set(doc["exclude"]["keys"])  # the plants themselves among them: make_eval planted exact, near alternately
    keys = list(plants)
    res["found"] = (sum(k in gone for k in keys[0::2]), sum(k in gone for k in keys[1::2]))
    res["top30"] = json.load(open(os.path.join(ds, "subsets", "top30.json")))["count"]
    res["success"] = json.load(open(os.path.join(ds, "dataset.json")))["counts"]["success"]
    for k, v in res.items():
        if isinstance(v, tuple) and len(v) == 3:
            print(f"  {k}: peak RSS {v[0] / 2**20:,.0f} MiB, {v[1]:.0f} s", flush=True)
    shutil.rmtree(os.path.join(work, "i2d"), ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [one(n, args.out) for n in args.rows]
    first, last = results[0], results[-1]
    commands = [k for k, v in first.items() if isinstance(v, tuple) and len(v) == 3]
    lines = ["| command | " + " | ".join(f"{r['rows']:,} rows: peak RSS MiB (wall s)" for r in results)
             + f" | ratio {last['rows'] // first['rows']}x rows |", "|---|" + "---|" * (len(results) + 1)]
    for c in commands:
        lines.append(f"| `{c}` | " + " | ".join(f"{r[c][0] / 2**20:,.0f} ({r[c][1]:.0f})" for r in results)
                     + f" | **{last[c][0] / first[c][0]:.2f}** |")
    worst = max(last[c][0] / first[c][0] for c in commands)
    checks = "; ".join(f"{r['rows']:,} rows: {r['success']:,} successes, top 30% kept {r['top30']:,}, "
                       f"excluded {r['excluded'][0]} exact + {r['excluded'][1]} near (planted 10 + 10; the planted "
                       f"samples among those excluded: {r['found'][0]} of 10 exact, {r['found'][1]} of 10 near)"
                       for r in results)
    body = (f"The curation commands of issue 28, each its own process (peak RSS sampled every 0.1 s), on an "
            f"img2dataset webdataset folder of N rows (95% successes, distinct 16x16 JPEGs, shards of {SHARD:,}) "
            f"imported with `psdclip data import`; `data score --embeddings` on {DIM}-d random parts written by the "
            f"script (no model: the scores' bookkeeping); `--exclude-near` decodes and hashes every stored image "
            f"against 40 evaluation images with 20 planted copies.\n\n" + "\n".join(lines) +
            f"\n\n{checks}.\n\n**Largest ratio {worst:.2f}** (goal <= 1.5: no command's client holds per-row state "
            f"of the whole dataset).\n")
    print(body)
    record("curate-memory", "Curation: peak memory of score, subset and stats as the dataset grows", body)


if __name__ == "__main__":
    main()
