"""What a training run shows and records as it goes: the progress bar or one log line per interval, metrics.jsonl
rows, TensorBoard / W&B (--report-to) and the in-training evaluation (--eval-every). Rank 0 only."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch

from ..core.errors import InputError
from .config import TrainConfig
from .loading import LoadedModel
from .models import resolve_model_name

log = logging.getLogger(__name__)


def progress_bar(cfg, rank, start):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


@dataclasses.dataclass
class Window:
    """The current log interval's counters (reset at each log row) and the run's start, for the ETA."""
    first_step: int
    started: float = dataclasses.field(default_factory=time.time)
    t0: float = dataclasses.field(default_factory=time.time)
    wait: float = 0.0
    samples: int = 0
    skipped_steps: int = 0
    sources: list = dataclasses.field(default_factory=list)  # a mixture's samples per source (this rank)
    source_samples: dict | None = None  # ... over every rank, for the log row


def log_row(state, step: int, logs: dict, lr: float, bar, total_steps: int = 0) -> None:
    logs = {k: float(v) for k, v in logs.items()}  # the step's only device -> host copies besides all_finite's
    window = state.window
    elapsed = max(time.time() - window.t0, 1e-9)
    record = {"step": step, "loss": sum(v for k, v in logs.items() if k.endswith("_loss")), **logs, "lr": lr,
              "logit_scale": float(state.model.logit_scale.detach().exp()), "samples_per_s": window.samples / elapsed,
              "data_wait_frac": window.wait / elapsed,
              "skipped_samples": int(sum(state.skipped_samples.values())) * state.world,
              "skipped_steps": window.skipped_steps, "time": time.time()}
    if window.source_samples is not None:  # a mixture (--data A::B --data-weights): samples per source, all ranks
        record["source_samples"] = window.source_samples
        window.source_samples = None
    device = next(state.model.parameters()).device
    if device.type == "cuda":  # this rank's peak memory so far, as open_clip users read it off nvidia-smi
        record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    with open(state.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if state.reporter is not None:
        state.reporter.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "time")}, step)
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
    elif total_steps:  # no bar (--no-progress, a log file): one line per log interval
        rate = (step - window.first_step) / max(time.time() - window.started, 1e-9)
        eta = (total_steps - step) / rate if rate > 0 else float("inf")
        log.info(f"step {step}/{total_steps}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                 f"{record['samples_per_s']:.0f} samples/s  data wait {record['data_wait_frac']:.0%}  "
                 f"ETA {_duration(eta)}")
    window.t0, window.wait, window.samples = time.time(), 0.0, 0


class Reporter:
    """--report-to: TensorBoard event files in RUN/tensorboard and/or a W&B run (its id fixed by the run directory,
    so that a resumed run continues the same one), fed the rows that metrics.jsonl gets. Rank 0 only."""

    def __init__(self, cfg: TrainConfig):
        kinds = {k.strip() for k in cfg.report_to.split(",") if k.strip()}
        self.tb = self.wandb = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--report-to tensorboard: the tensorboard package is not installed "
                                 "(pip install tensorboard)") from None
            self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise InputError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
            import hashlib

            run_id = hashlib.sha1(os.path.abspath(cfg.out).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project="psdclip", name=os.path.basename(os.path.abspath(cfg.out)), id=run_id,
                                    resume="allow", dir=cfg.out, config=dataclasses.asdict(cfg))

    def log(self, values: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Evaluator:
    """--eval-every: the eval suite on the model as it is, written to metrics.jsonl (and the reporter) as a row
    {"step", "eval": SUITE, "split", "metrics": {...}}. Rank 0 evaluates while the other ranks wait for it at
    their next collective (within --dist-timeout). `evaluate(loaded) -> metrics` is the evaluation stage's, given
    to `train` by its caller (training comes before evaluation in the stages)."""

    def __init__(self, cfg: TrainConfig, model, preprocess, tokenizer, device, evaluate):
        self.cfg, self.model, self.preprocess, self.tokenizer, self.device = cfg, model, preprocess, tokenizer, device
        self.evaluate = evaluate

    def run(self, state, step: int) -> None:
        cfg = self.cfg
        loaded = LoadedModel(model=self.model, preprocess=self.preprocess, tokenizer=self.tokenizer,
                             device=self.device, checkpoint="", run=cfg.out, step=step,
                             arch=resolve_model_name(cfg.model), loss=cfg.loss, digest="")
        t0 = time.time()
        self.model.eval()
        try:
            metrics = self.evaluate(loaded)
        finally:
            self.model.train()
        row = {"step": step, "eval": cfg.eval_suite, "split": "val" if cfg.eval_suite.startswith("synthetic:")
               else "all", "metrics": metrics, "eval_s": round(time.time() - t0, 2), "time": time.time()}
        with open(state.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if state.reporter is not None:
            state.reporter.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        state.window.t0 += time.time() - t0  # the evaluation's time does not count against the samples/s


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
