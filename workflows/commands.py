"""The functions behind every `psdclip` command: each runs its stage's function and prints what the user reads (stdout
belongs to the commands; the stages log). Each imports its stage only when it runs: see the COMMANDS table in
psdclip.workflows.cli."""
from __future__ import annotations

import json
import os

from ..pipeline.config import BuildConfig, EmojiConfig, ImportConfig, OracleConfig, SubsetConfig, ServeDataConfig, StatsConfig, SynthConfig
from ..core.errors import InputError


def cmd_build(cfg: BuildConfig) -> int:
    from ..pipeline.build import build
    from ..pipeline.stats import format_stats

    stats = build(cfg)
    print(format_stats(stats))
    b = stats["build"]
    if b.get("images_per_s"):
        print(f"\ndownloaded {b['downloaded_rows']:,} rows in {b['download_s']:.1f} s "
              f"({b['images_per_s']:.1f} images/s); total {b['total_s']:.1f} s")
    from ..core.storage import resolve

    print(f"dataset: {resolve(cfg.out)}")
    return 0


def cmd_stats(cfg: StatsConfig) -> int:
    from ..pipeline.dataset import Layout, unfinished_shards
    from ..pipeline.stats import format_stats, stream_stats
    from ..core.io import read_json

    stats = stream_stats(cfg.dataset)  # a batch of rows at a time
    layout = Layout(cfg.dataset)
    from ..core.storage import isfile

    if isfile(layout.stats_json):
        stats["build"] = read_json(layout.stats_json).get("build")
    left, planned = unfinished_shards(layout)
    if left:  # a build was cut off (or is running): the manifest is the last complete one
        stats["incomplete"] = {"unfinished_shards": left, "planned_shards": planned}
    stats["subsets"] = _subsets_summary(layout.subsets)
    text = format_stats(stats)
    if stats["subsets"]:
        text += "\n\nsubsets:\n" + "\n".join(
            f"  {n:<24} {d['count']:>12,}" + (f"   {_threshold(d['score'])} (range "
                                               f"{d['score']['range'][0]:.4f} .. {d['score']['range'][1]:.4f}) of "
                                               f"scores {d['score']['name']}" if d.get("score") else "")
            + (f"   left out: {d['excluded']['exact']} exact, {d['excluded']['near']} near copies of "
               f"{d['excluded']['eval']}" if d.get("excluded") else "")
            for n, d in stats["subsets"].items())
    print(json.dumps(stats, indent=2) if cfg.json else text)
    return 0


def _threshold(score: dict) -> str:
    """A score subset's rule as text: `clip_score >= 0.2812` or `nn_similarity <= 0.9500`."""
    if score.get("max") is not None:
        return f"{score['column']} <= {score['max']:.4f}"
    return f"{score['column']} >= {score['min']:.4f}"


def _subsets_summary(folder: str) -> dict:
    """name -> count (and a score subset's threshold and range) of each subsets/NAME.json."""
    from ..core.io import read_json
    from ..core.storage import isdir, join, listdir

    out = {}
    for name in sorted(listdir(folder)) if isdir(folder) else []:
        if name.endswith(".json"):
            doc = read_json(join(folder, name))
            out[name[:-5]] = {"count": int(doc.get("count", len(doc.get("keys", [])))),
                              **({"score": doc["score"]} if doc.get("score") else {}),
                              **({"excluded": {k: doc["exclude"][k] for k in ("exact", "near", "eval")}}
                                 if doc.get("exclude") else {})}
    return out


def cmd_synth(cfg: SynthConfig) -> int:
    from ..pipeline.synth import generate

    summary = generate(cfg)
    print(f"wrote {summary['images']:,} images (+{summary['heldout']:,} held-out scenes x variants) to "
          f"{summary['out']}; captions: {summary['caption_kinds']}")
    print(f"URL list: {os.path.join(summary['out'], 'urls.csv')} (for {cfg.base_url})")
    return 0


def cmd_emoji(cfg: EmojiConfig) -> int:
    from ..pipeline.emoji import generate

    r = generate(cfg)
    print(f"wrote {r['train_pairs']:,} training pairs of {r['emoji']:,} emoji ({r['heldout']:,} held out for "
          f"evaluation) to {r['out']}; captions: {r['caption_kinds']}")
    print(f"URL list: {os.path.join(r['out'], 'urls.csv')} (for {cfg.base_url}); evaluation lists: "
          f"{os.path.join(r['out'], 'heldout', 'id.csv')} and ood.csv (retrieval suites)")
    return 0


def cmd_import(cfg: ImportConfig) -> int:
    from ..pipeline.importer import import_folder

    r = import_folder(cfg)
    how = f"{r['linked']} of {r['shards']} shard(s) hard-linked" if r["format"] == "webdataset" else \
        f"{r['shards']} shard(s) rewritten as psdclip Arrow shards"
    print(f"imported {r['rows']:,} rows ({r['success']:,} success) from {cfg.folder}: {how}; statuses {r['counts']}")
    print(f"dataset: {r['out']}")
    return 0


def cmd_subset(cfg: SubsetConfig) -> int:
    from ..core.io import write_json
    from ..core.locks import writer_lock
    from ..pipeline.format import DatasetLayout
    from ..pipeline.curate import score_subset

    root = DatasetLayout(cfg.dataset).root
    path = os.path.join(root, "subsets", f"{cfg.name}.json")
    with writer_lock(os.path.join(root, "_state"), f"subset-{cfg.name}.lock", "data subset", "subset", "--name"):
        if os.path.isfile(path) and not cfg.force:
            raise InputError(f"--name {cfg.name}: {path} exists; give another name or --force to replace it")
        doc = score_subset(cfg.dataset, cfg.name, cfg.score or None, cfg.column, cfg.min_score, cfg.top_fraction,
                           cfg.within or None, cfg.exclude_near or None, cfg.max_hamming, cfg.max_score)
        write_json(path, doc, indent=1)
    sc, ex = doc.get("score"), doc.get("exclude")
    how = (f" with {_threshold(sc)} (range {sc['range'][0]:.4f} .. {sc['range'][1]:.4f})" if sc
           else "") + (f", {ex['exact']:,} exact and {ex['near']:,} near copies of {cfg.exclude_near} left out" if ex
                       else "")
    print(f"subset {cfg.name}: {doc['count']:,} of {doc['of_total']:,} samples{how} in "
          f"{len(doc['shards']) + bool(doc['boundary'])} shard(s); train on it with --data {path}")
    return 0


def cmd_oracle(cfg: OracleConfig) -> int:
    from ..pipeline.truth import write_oracle

    r = write_oracle(cfg.dataset, cfg.source, cfg.out, cfg.by)
    print(f"wrote {r['out']}: {r['samples']:,} samples in {r['groups']:,} image groups; the caption fits its image "
          f"in {r['caption_fits_image']:.1%} of them")
    return 0


def cmd_serve_data(cfg: ServeDataConfig) -> int:
    from ..pipeline.serve import make_server
    from ..pipeline.synth import write_url_list

    if not os.path.isdir(cfg.dir):
        raise InputError(f"{cfg.dir}: no such directory")
    try:
        server = make_server(os.path.abspath(cfg.dir), cfg.host, cfg.port)
    except OSError as err:
        raise InputError(f"--host {cfg.host} --port {cfg.port}: cannot listen ({err.strerror or err})") from None
    base = f"http://{cfg.host}:{server.server_address[1]}"
    if os.path.isfile(os.path.join(cfg.dir, "attributes.parquet")):
        # urls.csv, written by `data synth`, is the user's file and is never rewritten: another address gets
        # its own list beside it
        synth = os.path.join(cfg.dir, "synth.json")
        written_for = None
        if os.path.isfile(synth):
            with open(synth, encoding="utf-8") as f:
                written_for = json.load(f).get("config", {}).get("base_url")
        if written_for and written_for.rstrip("/") == base and os.path.isfile(os.path.join(cfg.dir, "urls.csv")):
            path = os.path.join(cfg.dir, "urls.csv")
        else:
            name = f"urls-{cfg.host.replace(':', '_')}-{server.server_address[1]}.csv"
            path = write_url_list(cfg.dir, base, name)
        print(f"URL list for this address: {path}")
    print(f"serving {os.path.abspath(cfg.dir)} on {base} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_train(cfg) -> int:
    from .runs import train_run

    result = train_run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps; run in {os.path.abspath(result['out'])}")
    return 0


def cmd_export(cfg) -> int:
    from ..train.export import export

    r = export(cfg)
    name = os.path.splitext(os.path.basename(r["config"]))[0]
    print(f"wrote {r['out']} (open_clip checkpoint of {r['arch']}, step {r['step']}) and {r['config']}")
    print(f"load it with: import open_clip; open_clip.add_model_config({r['config']!r}); "
          f"model, _, preprocess = open_clip.create_model_and_transforms({name!r}, pretrained={r['out']!r})")
    return 0


def cmd_eval(cfg) -> int:
    from ..eval.evaluate import evaluate, format_result

    result = evaluate(cfg)
    if cfg.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2), flush=True)
    else:
        print(format_result(result), flush=True)
    return 0


def cmd_compare(cfg) -> int:
    from ..eval.compare import compare

    result = compare(cfg)
    print(result["markdown"])
    print(f"\nwritten to {result['out']}/compare.md, compare.json, compare.png")
    return 0


def cmd_score(cfg) -> int:
    from ..index.score import score

    r = score(cfg)
    if r is not None:
        near = f", {r['near_duplicates_searched']} searched for near duplicates" \
            if r["near_duplicates_searched"] is not None else ""
        print(f"scores {r['name']}: {r['samples']:,} samples in {r['shard_files']} shard file(s) ({r['written']} "
              f"written now{near}) in {r['folder']}")
    return 0


def cmd_index_build(cfg) -> int:
    from ..index.build import build_index

    doc = build_index(cfg)
    if "rank" in doc:
        print(f"rank {doc['rank']}: embedded {doc['embedded']['embedded_now']:,} rows of "
              f"{doc['embedded']['shards']} shards; rank 0 builds the index")
        return 0
    r = doc["recall_at_k"]["index.faiss"]
    shards = len(doc["files"]["index.faiss"])
    print(f"indexed {doc['count']:,} images x {doc['dim']} dims with {doc['factory']} ({doc['why']})"
          f"{f' in {shards} shards' if shards > 1 else ''}; recall@{r['k']} vs exact {r['recall']:.3f}; "
          f"index in {os.path.abspath(cfg.out)}")
    return 0


def cmd_query(cfg) -> int:
    from ..index.query import query

    s, results = query(cfg)
    if cfg.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            extra = "".join(f"  {c}={r[c]}" for c in s.extra if r.get(c) is not None)  # --save-additional-columns
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['key']}  {r['caption'][:70]}{extra}")
    return 0


def cmd_serve(cfg) -> int:
    from ..index.launch import serve

    return serve(cfg, announce=lambda line: print(line, flush=True))
