"""The `psdclip` command. Each subcommand is a typed dataclass config plus a function; the options, their
help and their validation come from the dataclass (see psdclip.workflows.config).

One table, COMMANDS, names every command: (path, config class, "module:function", help). The config classes
live in light modules (no torch, faiss or open_clip), and a command's module is imported only when that
command runs, so `psdclip --help` and `psdclip data serve` start at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from ..index.config import IndexBuildConfig, QueryConfig, ServeConfig
from ..pipeline.config import (BuildConfig, EmojiConfig, ImportConfig, OracleConfig, ScoreConfig, ServeDataConfig,
                               StatsConfig, SubsetConfig, SynthConfig)
from ..core import logs
from ..core.errors import InputError, PsdclipError
from ..eval.config import CompareConfig, EvalConfig
from ..train.config import ExportConfig, TrainConfig

from . import __version__
from .config import add_dataclass_arguments, build_config, load_yaml
from .demo import DemoConfig
from .recipe import RunConfig
from .sweep_spec import SweepConfig


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    config: type
    target: str  # "module:function", imported when the command runs
    help: str

    def run(self, cfg) -> int:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)(cfg)


COMMANDS = (
    Command(("data", "build"), BuildConfig, "psdclip.workflows.commands:cmd_build",
            "build a sharded dataset from URL lists"),
    Command(("data", "stats"), StatsConfig, "psdclip.workflows.commands:cmd_stats",
            "counts per status, success rate, sizes, failing shards"),
    Command(("data", "synth"), SynthConfig, "psdclip.workflows.commands:cmd_synth",
            "generate the synthetic image-caption source"),
    Command(("data", "score"), ScoreConfig, "psdclip.workflows.commands:cmd_score",
            "each sample's image-caption similarity under a checkpoint, per shard (DATASET/scores/)"),
    Command(("data", "subset"), SubsetConfig, "psdclip.workflows.commands:cmd_subset",
            "a subset by a score threshold (--min-score, --top-fraction), nested in another"),
    Command(("data", "import"), ImportConfig, "psdclip.workflows.commands:cmd_import",
            "make an img2dataset output folder a psdclip dataset (no download)"),
    Command(("data", "emoji"), EmojiConfig, "psdclip.workflows.commands:cmd_emoji",
            "fetch the emoji real-image source (npm packages of several vendors, CLDR labels)"),
    Command(("data", "oracle"), OracleConfig, "psdclip.workflows.commands:cmd_oracle",
            "the ground-truth groups of a synthetic or emoji dataset (for train --oracle-targets)"),
    Command(("data", "serve"), ServeDataConfig, "psdclip.workflows.commands:cmd_serve_data",
            "serve a synthetic source over HTTP (loopback)"),
    Command(("train",), TrainConfig, "psdclip.workflows.commands:cmd_train",
            "train CLIP, PSD or SigLIP on streamed shards (alone or under torchrun)"),
    Command(("export",), ExportConfig, "psdclip.workflows.commands:cmd_export",
            "write a run's model as an open_clip checkpoint"),
    Command(("eval",), EvalConfig, "psdclip.workflows.commands:cmd_eval",
            "zero-shot, linear probe, retrieval and robustness on a suite"),
    Command(("compare",), CompareConfig, "psdclip.workflows.commands:cmd_compare",
            "put runs side by side: metrics, differences with bootstrap CIs, a PNG chart"),
    Command(("index", "build"), IndexBuildConfig, "psdclip.workflows.commands:cmd_index_build",
            "encode a dataset and build a FAISS index under memory and latency budgets"),
    Command(("index", "query"), QueryConfig, "psdclip.workflows.commands:cmd_query",
            "nearest neighbours of a text, an image or an embedding"),
    Command(("serve",), ServeConfig, "psdclip.workflows.commands:cmd_serve",
            "the retrieval service (FastAPI + uvicorn) and its web page"),
    Command(("demo",), DemoConfig, "psdclip.workflows.demo:run_demo",
            "the embedded end-to-end demo on synthetic data"),
    Command(("run",), RunConfig, "psdclip.workflows.recipe:run_recipe",
            "run an end-to-end recipe: data -> train -> eval -> index (-> serve)"),
    Command(("sweep",), SweepConfig, "psdclip.workflows.sweep:run_sweep",
            "a scaling-law sweep: subsets x methods x seeds, gathered, fitted and plotted"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="psdclip", description="psdclip: URL lists -> datasets -> CLIP/PSD training -> "
                     "FAISS retrieval. Every command takes --config FILE.yaml; options override it.")
    parser.add_argument("--version", action="version", version=f"psdclip {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_const", const="WARNING", dest="_log_level",
                      help="only warnings and errors on stderr (progress bars stay; --no-progress turns them off)")
    loud.add_argument("-v", "--verbose", action="store_const", const="DEBUG", dest="_log_level",
                      help="debug messages too")
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
    logs.setup(args._log_level)
    cmd = getattr(args, "_command", None)
    if cmd is None:
        chosen = tuple(v for k, v in sorted(vars(args).items()) if k.startswith("cmd") and v)
        (parser._psd_parents.get(chosen, parser)).print_help()  # type: ignore[attr-defined]
        return 2
    values = {k: v for k, v in vars(args).items() if not k.startswith("cmd") and k not in ("_command", "config",
                                                                                             "_log_level")}
    try:
        cfg = build_config(cmd.config, load_yaml(args.config) if args.config else {}, values,
                           source=args.config or "config")
        rc = int(cmd.run(cfg) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not in Python's flush at exit
        return rc
    except PsdclipError as err:  # bad input exits 2 (as argparse's usage errors do), a failure of the work 1
        print(f"psdclip: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except (OSError, RuntimeError) as err:
        from ..core.errors import disk_full, is_disk_full

        if isinstance(err, BrokenPipeError):
            return _closed_pipe()
        if not is_disk_full(err):
            raise
        print(f"psdclip: error: {disk_full(getattr(err, 'filename', None) or os.getcwd())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("psdclip: interrupted", file=sys.stderr)
        return 130


def _closed_pipe() -> int:
    """`psdclip ... | head`: the reader is gone; exit quietly as a shell tool does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail on the closed pipe again
    return 141


def entry() -> None:
    """The `psdclip` console script, and `python -m psdclip.workflows.cli` (what torchrun starts): main(), then a
    prompt exit. Python's teardown of the modules torch, torchvision and open_clip load takes ~1.3 s after
    every command that imported them; it only frees memory the OS takes back anyway, so it is skipped. What a
    normal exit does first is kept: non-daemon threads are joined, atexit handlers run (logging, multiprocessing's
    children, Dask clients) and stdout/stderr are flushed. An exception main() lets through exits as usual."""
    import atexit
    import os
    import threading

    try:
        rc = main()
    except SystemExit as e:  # argparse's usage errors and --help
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    # what the interpreter's exit does first: the threading atexit hooks (concurrent.futures' wakes and ends its
    # idle pool workers, which torch.compile leaves behind), then a join of every non-daemon thread; joining the
    # threads alone waited for ever on those workers
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()  # pylint: disable=protected-access
    else:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`| head`) or a stream closed: nothing left to say
            rc = rc or 141
    os._exit(rc)


if __name__ == "__main__":
    entry()
