"""What the workflows (the CLI's train command, recipes, sweeps, filters) do with a run folder: train it (with the
eval stage's in-training evaluation), here or by a runner (RUNNERS: another process, torchrun, a Dask cluster), name
the suites it is evaluated on, and prune it once finished."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ..core.errors import InputError
from ..core.io import read_json, write_json


def train_run(cfg) -> dict:
    """`psdclip train` as every workflow runs it: train.loop.train with --eval-every's evaluation (the eval stage's,
    which the training stage does not import)."""
    from ..eval.evaluate import in_training
    from ..train.loop import train

    return train(cfg, evaluate=in_training(cfg.eval_suite) if cfg.eval_every else None)


def suite_spec(suite: str, src: str) -> str:
    """A sweep's suite entry as `psdclip eval --suite` takes it: plain `synthetic` means the sweep's source, and
    `{source}` in an entry its folder (`ood=retrieval:{source}/heldout/ood.csv`); a `NAME=` in front names the
    suite's metrics (ood.retrieval.t2i_R@1), so that two suites of one kind keep theirs apart."""
    suite = suite.split("=", 1)[1] if suite_name(suite) else suite
    return f"synthetic:{src}" if suite == "synthetic" else suite.replace("{source}", src or "")


def suite_name(suite: str) -> str:
    head = suite.split(":", 1)[0]
    return head.split("=", 1)[0] if "=" in head else ""


def prune(run: str, evals: list[str]) -> None:
    """A finished run keeps its configs, metrics.jsonl and the metrics of its evaluations: checkpoints, PSD's
    embedding bank, the feature cache, the per-example arrays of each evaluation (for `psdclip compare`'s bootstrap; the sweep pairs
    runs by seed) and the plots (`psdclip.train.plots.plot_run` redraws them from metrics.jsonl) go, so that a
    study of a hundred runs commits in a few MB."""
    for sub in ("checkpoints", "bank", os.path.join("eval", "cache"), "plots"):
        shutil.rmtree(os.path.join(run, sub), ignore_errors=True)
    for path in evals:
        result = read_json(path)
        if result.pop("examples", None) is not None:
            result["pruned"] = "per-example arrays removed by the sweep's prune: true"
            write_json(path, result, indent=1)


# ---- runners: how a sweep trains one run from its RUN/train.yaml (sweep.runner) -------------------------------

def _exe(name: str = "psdclip") -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _call(cmd: list[str], run: str) -> None:
    rc = subprocess.call(cmd)
    if rc:
        raise InputError(f"[sweep] run {run} failed (exit {rc}); rerun the sweep to resume")


def run_sequential(spec, train_yaml: str, run: str) -> None:
    """`psdclip train` in a process of its own."""
    _call([_exe(), "train", "--config", train_yaml], run)


def run_torchrun(spec, train_yaml: str, run: str) -> None:
    """torchrun --standalone with sweep.nproc ranks."""
    _call([_exe("torchrun"), "--standalone", "--nproc-per-node", str(spec.nproc), "-m", "psdclip.workflows.cli",
           "train", "--config", train_yaml], run)


def run_inprocess(spec, train_yaml: str, run: str) -> None:
    """In this process: no process start-up per run (small runs, tests); a crash ends the sweep."""
    from ..train.config import TrainConfig

    from .config import build_config, load_yaml

    train_run(build_config(TrainConfig, load_yaml(train_yaml), {}, source=train_yaml))


def run_dask(spec, train_yaml: str, run: str) -> None:
    """`psdclip train` as a task of the Dask cluster at sweep.scheduler."""
    from dask.distributed import Client

    with Client(spec.scheduler) as client:
        rc = client.submit(subprocess.call, [_exe(), "train", "--config", train_yaml], pure=False).result()
    if rc:
        raise InputError(f"[sweep] run {run} failed on the Dask cluster (exit {rc})")


RUNNERS = {"sequential": run_sequential, "torchrun": run_torchrun, "inprocess": run_inprocess, "dask": run_dask}
