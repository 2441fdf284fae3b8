"""The `psdclip` command. Each subcommand is a typed dataclass config plus a function; the options, their
help and their validation come from the dataclass (see psdclip.workflows.config)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from psdclip.pipeline.config import BuildConfig, ServeDataConfig, StatsConfig, SynthConfig
from psdclip.pipeline.errors import PsdclipError

from . import __version__
from .config import add_dataclass_arguments, build_config, load_yaml
from psdclip.train.config import TrainConfig
from psdclip.index.build import IndexBuildConfig
from psdclip.index.query import QueryConfig
from psdclip.index.service import ServeConfig
from psdclip.train.compare import CompareConfig
from psdclip.train.evaluate import EvalConfig
from psdclip.train.export import ExportConfig
from .demo import DemoConfig, run_demo
from .recipe import RunConfig
from .sweep import SweepConfig


def cmd_build(cfg: BuildConfig) -> int:
    from psdclip.pipeline.build import build
    from psdclip.pipeline.dataset import format_stats

    stats = build(cfg)
    print(format_stats(stats))
    b = stats["build"]
    if b.get("images_per_s"):
        print(f"\ndownloaded {b['downloaded_rows']:,} rows in {b['download_s']:.1f} s "
              f"({b['images_per_s']:.1f} images/s); total {b['total_s']:.1f} s")
    print(f"dataset: {os.path.abspath(cfg.out)}")
    return 0


def cmd_stats(cfg: StatsConfig) -> int:
    from psdclip.pipeline.dataset import Layout, compute_stats, format_stats, load_manifest, read_json

    manifest = load_manifest(cfg.dataset)
    layout = Layout(cfg.dataset)
    info = read_json(layout.dataset_json) if os.path.isfile(layout.dataset_json) else {}
    stats = compute_stats(manifest, layout, info.get("output_format", "webdataset"))
    if os.path.isfile(layout.stats_json):
        stats["build"] = read_json(layout.stats_json).get("build")
    print(json.dumps(stats, indent=2) if cfg.json else format_stats(stats))
    return 0


def cmd_synth(cfg: SynthConfig) -> int:
    from psdclip.pipeline.synth import generate

    summary = generate(cfg)
    print(f"wrote {summary['images']:,} images (+{summary['heldout']:,} held-out scenes x variants) to "
          f"{summary['out']}; captions: {summary['caption_kinds']}")
    print(f"URL list: {os.path.join(summary['out'], 'urls.csv')} (for {cfg.base_url})")
    return 0


def cmd_serve_data(cfg: ServeDataConfig) -> int:
    from psdclip.pipeline.serve import make_server
    from psdclip.pipeline.synth import write_url_list

    if not os.path.isdir(cfg.dir):
        raise PsdclipError(f"{cfg.dir}: no such directory")
    server = make_server(os.path.abspath(cfg.dir), cfg.host, cfg.port)
    base = f"http://{cfg.host}:{server.server_address[1]}"
    if os.path.isfile(os.path.join(cfg.dir, "attributes.parquet")):
        path = write_url_list(cfg.dir, base)
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
    from psdclip.train.loop import train

    result = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps; run in {os.path.abspath(result['out'])}")
    return 0


def cmd_export(cfg) -> int:
    from psdclip.train.export import export

    return export(cfg)


def _run(module: str, func: str, cfg) -> int:
    import importlib

    return getattr(importlib.import_module(module), func)(cfg)


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    config: type
    run: object
    help: str


COMMANDS = (
    Command(("data", "build"), BuildConfig, cmd_build, "build a sharded dataset from URL lists"),
    Command(("data", "stats"), StatsConfig, cmd_stats, "counts per status, success rate, sizes, failing shards"),
    Command(("data", "synth"), SynthConfig, cmd_synth, "generate the synthetic image-caption source"),
    Command(("data", "serve"), ServeDataConfig, cmd_serve_data, "serve a synthetic source over HTTP (loopback)"),
    Command(("train",), TrainConfig, cmd_train, "train CLIP or PSD on streamed shards (alone or under torchrun)"),
    Command(("export",), ExportConfig, cmd_export, "write a run's model as an open_clip checkpoint"),
    Command(("eval",), EvalConfig, lambda cfg: __import__("psdclip.train.evaluate", fromlist=["x"]).cmd_eval(cfg),
            "zero-shot, linear probe, retrieval and robustness on a suite"),
    Command(("compare",), CompareConfig, lambda cfg: __import__("psdclip.train.compare", fromlist=["x"]).cmd_compare(cfg),
            "put runs side by side: metrics, differences with bootstrap CIs, a PNG chart"),
    Command(("index", "build"), IndexBuildConfig, lambda c: _run("psdclip.index.build", "cmd_index_build", c),
            "encode a dataset and build a FAISS index under memory and latency budgets"),
    Command(("index", "query"), QueryConfig, lambda c: _run("psdclip.index.query", "cmd_query", c),
            "nearest neighbours of a text, an image or an embedding"),
    Command(("serve",), ServeConfig, lambda c: _run("psdclip.index.service", "cmd_serve", c),
            "the retrieval service (FastAPI + uvicorn) and its web page"),
    Command(("demo",), DemoConfig, run_demo, "the embedded end-to-end demo on synthetic data"),
    Command(("run",), RunConfig, lambda c: _run("psdclip.workflows.recipe", "run_recipe", c),
            "run an end-to-end recipe: data -> train -> eval -> index (-> serve)"),
    Command(("sweep",), SweepConfig, lambda c: _run("psdclip.workflows.sweep", "run_sweep", c),
            "a scaling-law sweep: subsets x methods x seeds, gathered, fitted and plotted"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="psdclip", description="psdclip: URL lists -> datasets -> CLIP/PSD training -> "
                     "FAISS retrieval. Every command takes --config FILE.yaml; options override it.")
    parser.add_argument("--version", action="version", version=f"psdclip {__version__}")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="cmd0",
                                                                                           metavar="COMMAND")}
    parents: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                parents[prefix] = sub
                groups[prefix] = sub.add_subparsers(dest=f"cmd{depth}", metavar="COMMAND")
        doc = (cmd.config.__doc__ or "").strip()
        sub = groups[cmd.path[:-1]].add_parser(cmd.path[-1], help=cmd.help, description=doc)
        sub.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file first")
        add_dataclass_arguments(sub, cmd.config)
        sub.set_defaults(_command=cmd)
    parser._psd_parents = parents  # type: ignore[attr-defined]
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    cmd = getattr(args, "_command", None)
    if cmd is None:
        chosen = tuple(v for k, v in sorted(vars(args).items()) if k.startswith("cmd") and v)
        (parser._psd_parents.get(chosen, parser)).print_help()  # type: ignore[attr-defined]
        return 2
    values = {k: v for k, v in vars(args).items() if not k.startswith("cmd") and k not in ("_command", "config")}
    try:
        cfg = build_config(cmd.config, load_yaml(args.config) if args.config else {}, values,
                           source=args.config or "config")
        return int(cmd.run(cfg) or 0)
    except PsdclipError as err:
        print(f"psdclip: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("psdclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
