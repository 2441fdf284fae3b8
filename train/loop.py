"""The training loop: `psdclip train`, alone or under torchrun (DDP; NCCL on GPU, gloo on CPU).

It reads top to bottom: set-up, resume, then for each step the learning rate from lr_at(step), forward,
the loss module's named losses, backward, clip, step, log, checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import yaml

from psdclip.pipeline.dataset import write_text
from psdclip.pipeline.errors import InputError, PsdclipError

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import ShardStream, make_loader
from .losses import CLIPLoss, PSDLoss, PSDSchedule
from .models import build_model, model_config, resolve_model_name

log = logging.getLogger(__name__)


PLOT_EVERY_S = 120.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings of size 1 and the logit scale (open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def setup_distributed(cfg: TrainConfig):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = ckpt.resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    return rank, world, device


def _fine_tuning_options(model, cfg: TrainConfig) -> None:
    """Fine-tuning options as open_clip applies them: locked towers (LiT: parameters frozen, optionally all but
    the last groups/layers) and gradient checkpointing."""
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)  # its LayerNorms freeze too
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)


def make_loss(cfg: TrainConfig, rank: int, world: int):
    if cfg.loss == "clip":
        return CLIPLoss(rank=rank, world_size=world)
    schedule = PSDSchedule(total_steps=cfg.steps, **{f: getattr(cfg, f) for f in (
        "alpha_start", "alpha_max", "alpha_schedule", "rho_start", "rho_end", "rho_schedule")})
    return PSDLoss(schedule, cfg.teacher_temperature, seed=cfg.seed, rank=rank, world_size=world)


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg)
    before = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, rank, world, device)
    finally:
        torch.set_num_threads(before)  # a caller in the same process (a sweep, a test) keeps its own setting


def _train(cfg: TrainConfig, rank: int, world: int, device) -> dict:
    if cfg.batch_size % (world * cfg.accum):
        raise InputError(f"--batch-size {cfg.batch_size} must divide evenly over {world} rank(s) x {cfg.accum} "
                         f"micro-batches")
    micro = cfg.batch_size // world // cfg.accum
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    torch.manual_seed(cfg.seed)
    model, preprocess_train, preprocess_val, tokenizer = build_model(cfg.model, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    loss_fn = make_loss(cfg, rank, world)
    _fine_tuning_options(model, cfg)  # before the optimizer: it takes the parameters that still train
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for checkpoint compatibility
    start_step, data_position, teacher_state = 0, {}, None
    resumed = _resume(cfg, ckpt_dir, model, optimizer, scaler)
    if resumed:
        start_step, data_position, teacher_state = resumed
    elif cfg.pretrained:  # a resumed run continues from its own weights
        source = ckpt.load_pretrained(model, cfg.pretrained, resolve_model_name(cfg.model))
        if rank == 0:
            log.info(f"psdclip: starting from the weights of {source}")
    ema = _make_teacher(model, teacher_state) if cfg.loss == "psd" and (cfg.ema_teacher or cfg.snapshot_every) \
        else None
    if rank == 0:
        _truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), start_step)
        if cfg.warmup_steps > cfg.steps:
            log.warning(f"psdclip: warning: --warmup {cfg.warmup:g} is {cfg.warmup_steps} steps, more than --steps "
                        f"{cfg.steps}: the learning rate never reaches --lr {cfg.lr:g}")
        os.makedirs(os.path.join(cfg.out, "plots"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
            yaml.safe_dump({**dataclasses.asdict(cfg), "model_arch": resolve_model_name(cfg.model), "world_size": world},
                           f, sort_keys=False)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    stream = ShardStream(cfg.data, micro, preprocess_train, tokenizer, seed=cfg.seed, rank=rank, world_size=world,
                         shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, follow=cfg.follow,
                         resume=data_position)
    if stream.source.samples is not None and micro * world > stream.source.samples:
        raise InputError(f"--batch-size {cfg.batch_size}: larger than the {stream.source.samples:,} samples of "
                         f"--data {cfg.data} (a contrastive batch would hold the same pair twice)")
    batches = iter(make_loader(stream, cfg.workers))
    bar = _progress(cfg, rank, start_step)
    state = TrainState(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler, teacher=ema, rank=rank, world=world,
                       window=_Window(first_step=start_step), position=dict(data_position),
                       reporter=Reporter(cfg) if rank == 0 else None)
    evaluator = _Evaluator(cfg, model, preprocess_val, tokenizer, device) if cfg.eval_every and rank == 0 else None
    step = start_step
    end = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)
    interrupt = _Interrupt()
    last_plot = time.time()
    for step in range(start_step, end):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        at_step_start = dict(state.position)
        micro_batches = []
        for _ in range(cfg.accum):
            t_wait = time.time()
            try:
                batch = _next_batch(batches)
            except _WorkerEnded as err:
                if not interrupt.wait(2.0):  # no stop signal came with it: a worker died on its own
                    raise PsdclipError(f"{err}; the same command resumes from the last checkpoint") from None
                if step > start_step:  # the steps done so far are whole: keep them
                    _checkpoint(state, step, at_step_start)
                    state.writer.wait()
                log.warning(f"psdclip: {interrupt.name} at step {step}: checkpoint saved; the same command resumes "
                         f"from it")
                raise KeyboardInterrupt from None
            state.window.wait += time.time() - t_wait
            state.position[str(batch["reader"])] = {"epoch": batch["epoch"], "samples": batch["samples"],
                                                    "batches": batch["batches"]}
            state.skipped_samples[batch["reader"]] = batch["skipped"]
            micro_batches.append((batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format),
                                  batch["text"].to(device, non_blocking=True)))
            state.window.samples += batch["image"].shape[0] * world
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = forward_backward(net, model, loss_fn, micro_batches, step, ema=ema, world=world)
        finite = all_finite(sum(v for k, v in losses.items() if k.endswith("_loss")), world)
        logs = {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}  # read on log steps only
        if not finite:
            if cfg.nan_policy == "stop":
                _nan_diagnostics(cfg, step, logs, lr, model, batch)
            optimizer.zero_grad(set_to_none=True)
            state.window.skipped_steps += 1
            log.warning(f"psdclip: warning: non-finite loss at step {step}; step skipped")
            continue
        if cfg.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if ema is not None and cfg.ema_teacher:
            _ema_update(ema, model, cfg.ema_decay)
        elif ema is not None and (step + 1) % cfg.snapshot_every == 0:
            _ema_update(ema, model, 0.0)  # PS-KD: the teacher becomes the model as it is now
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            _log(state, done, logs, lr, bar, total_steps=end)
        if evaluator is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            evaluator.run(state, done)
        stopping = interrupt.agreed(world, device)
        if done % cfg.checkpoint_every == 0 or done == end or stopping:
            # plots with the checkpoint at the end, on a stop, and at most every PLOT_EVERY_S in between (drawing
            # five PNGs takes ~1 s: at every checkpoint of a short run it would cost more than the training)
            plot = done == end or stopping or time.time() - last_plot >= PLOT_EVERY_S
            _checkpoint(state, done, state.position, plot=plot)
            last_plot = time.time() if plot else last_plot
        if bar is not None:
            bar.update(1)
        if stopping:
            state.writer.wait()  # the checkpoint is on disk before the process ends
            if bar is not None:
                bar.close()
            log.warning(f"psdclip: {interrupt.name} at step {done}: checkpoint saved; the same command resumes from it")
            raise KeyboardInterrupt
    interrupt.restore()
    state.writer.wait()
    if bar is not None:
        bar.close()
    if state.reporter is not None:
        state.reporter.close()
    # (the plots were drawn with the last checkpoint, which the last step always writes)
    if world > 1:
        dist.barrier()
    return {"steps": end, "out": cfg.out}


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler or torchrun ending the job) finish the current step, write a
    checkpoint and stop; the ranks of a distributed run agree on it (one small all-reduce a step) so that none is
    left waiting. The loader workers ignore SIGINT, which a terminal sends to the whole process group (see
    data._worker_init)."""

    def __init__(self):
        import signal
        import threading

        self.name = ""
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        import signal

        self.name = signal.Signals(signum).name

    def wait(self, seconds: float) -> bool:
        """Whether a stop signal has come, waiting up to `seconds` for one sent at the same time as what ended
        a worker."""
        deadline = time.time() + seconds
        while not self.name and time.time() < deadline:
            time.sleep(0.05)
        return bool(self.name)

    def agreed(self, world: int, device) -> bool:
        if world == 1:
            return bool(self.name)
        flag = torch.tensor([1.0 if self.name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.name:
            self.name = "a signal on another rank"
        return bool(flag.item())

    def restore(self):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def all_finite(total: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank: decided together (one all-reduce), so that all ranks skip or
    stop at the same step instead of one leaving the others waiting in the next collective."""
    ok = torch.isfinite(total.detach()).all().to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class _WorkerEnded(Exception):
    """A DataLoader worker is gone (a SIGTERM to the process group ends workers and trainer together)."""


def _next_batch(batches):
    try:
        return next(batches)
    except PsdclipError as err:  # raised in a DataLoader worker: keep its own one-line message
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise type(err)(lines[-1] if lines else str(err)) from None
    except RuntimeError as err:
        if "DataLoader worker" in str(err):
            raise _WorkerEnded(str(err).splitlines()[0].strip()) from None
        raise


def _progress(cfg, rank, start):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


@dataclasses.dataclass
class _Window:
    """The current log interval's counters (reset at each log row) and the run's start, for the ETA."""
    first_step: int
    started: float = dataclasses.field(default_factory=time.time)
    t0: float = dataclasses.field(default_factory=time.time)
    wait: float = 0.0
    samples: int = 0
    skipped_steps: int = 0


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step (as open_clip's TrainState): the modules and optimizer, this
    rank's data position per reader, samples its readers skipped, and the log interval's counters."""
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    teacher: torch.nn.Module | None
    rank: int
    world: int
    window: _Window
    position: dict = dataclasses.field(default_factory=dict)
    skipped_samples: dict = dataclasses.field(default_factory=dict)
    reporter: "Reporter | None" = None
    writer: "_BackgroundWriter" = dataclasses.field(default_factory=lambda: _BackgroundWriter())

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.out, "metrics.jsonl")


def _log(state: TrainState, step: int, logs: dict, lr: float, bar, total_steps: int = 0) -> None:
    logs = {k: float(v) for k, v in logs.items()}  # the step's only device -> host copies besides all_finite's
    window = state.window
    elapsed = max(time.time() - window.t0, 1e-9)
    record = {"step": step, "loss": sum(v for k, v in logs.items() if k.endswith("_loss")), **logs, "lr": lr,
              "logit_scale": float(state.model.logit_scale.detach().exp()), "samples_per_s": window.samples / elapsed,
              "data_wait_frac": window.wait / elapsed,
              "skipped_samples": int(sum(state.skipped_samples.values())) * state.world,
              "skipped_steps": window.skipped_steps, "time": time.time()}
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


class _Evaluator:
    """--eval-every: the eval suite on the model as it is, written to metrics.jsonl (and the reporter) as a row
    {"step", "eval": SUITE, "split", "metrics": {...}}. Rank 0 evaluates while the other ranks wait for it at
    their next collective (within --dist-timeout)."""

    def __init__(self, cfg: TrainConfig, model, preprocess, tokenizer, device):
        self.cfg, self.model, self.preprocess, self.tokenizer, self.device = cfg, model, preprocess, tokenizer, device

    def run(self, state: TrainState, step: int) -> None:
        from .checkpoint import LoadedModel
        from .evaluate import evaluate_in_training

        cfg = self.cfg
        loaded = LoadedModel(model=self.model, preprocess=self.preprocess, tokenizer=self.tokenizer,
                             device=self.device, checkpoint="", run=cfg.out, step=step,
                             arch=resolve_model_name(cfg.model), loss=cfg.loss, digest="")
        t0 = time.time()
        self.model.eval()
        try:
            metrics = evaluate_in_training(loaded, cfg.eval_suite)
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


class _BackgroundWriter:
    """Rank 0 writes checkpoints and draws plots on one background thread, one job at a time, so that neither its
    training nor the other ranks wait for the disk (they used to wait at a barrier under the process-group
    timeout). A job's payload is a host-memory snapshot taken when it is submitted. An error in a job is raised
    at the next submit or wait."""

    def __init__(self):
        self.thread = None
        self.error: BaseException | None = None

    def submit(self, job) -> None:
        import threading

        self.wait()
        self.thread = threading.Thread(target=self._run, args=(job,), name="psdclip-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as err:  # pylint: disable=broad-except  (re-raised in the training thread)
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def _snapshot(obj):
    """A copy in host memory of a (nested) state dict: what the next optimizer step changes is not what is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _checkpoint(state: TrainState, step: int, position: dict, plot: bool = True) -> None:
    """Every rank's data position gathered (the one collective); rank 0 snapshots model, optimizer and RNG
    states and hands the write (and, when `plot`, the run's plots) to its background writer."""
    cfg, world = state.cfg, state.world
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, position)
        merged = {}
        for p in gathered:
            merged.update(p)
        position = merged
    if state.rank == 0:
        state.writer.wait()  # one write in flight at most (and its error, if any, surfaces here)
        payload = _snapshot({
            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(),
            "step": step, "rng": ckpt.rng_state(), "data": {"position": position, "world_size": world,
                                                            "workers": cfg.workers},
            "model_arch": resolve_model_name(cfg.model), "model_cfg": json.dumps(model_config(cfg.model)),
            "loss": cfg.loss, "config": json.dumps(dataclasses.asdict(cfg)),
            **({"teacher": state.teacher.state_dict()} if state.teacher is not None else {}),
        })

        def job():
            ckpt.save(state.ckpt_dir, step, payload, cfg.keep)
            if plot:
                from .plots import plot_run

                plot_run(cfg.out)

        state.writer.submit(job)


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the rows up to the step training continues from: after a fall-back to an older checkpoint (the newest
    was damaged) or a fresh start, the steps after it are trained again and must not be logged twice."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped
            continue
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def _resume(cfg, ckpt_dir, model, optimizer, scaler):
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        if not os.path.isdir(ckpt_dir):
            return None
        ckpt.clean_partial(ckpt_dir)
        found = ckpt.find_latest(ckpt_dir)
        if found is None:
            return None
        path, state = found
    else:
        path, state = cfg.resume, ckpt.load(cfg.resume)
    arch = resolve_model_name(cfg.model)
    if state.get("model_arch") != arch:
        raise InputError(f"{path}: checkpoint is for model {state.get('model_arch')!r}, not {arch!r}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"{path}: incompatible checkpoint ({str(err).splitlines()[0][:200]})") from None
    scaler.load_state_dict(state.get("scaler", {}))
    ckpt.set_rng_state(state["rng"])
    data = state.get("data", {})
    world = int(os.environ.get("WORLD_SIZE", 1))
    position = data.get("position", {})
    if data.get("world_size") != world or data.get("workers") != cfg.workers:
        seen = sum(int(p.get("samples", 0)) for p in position.values())
        log.warning(f"psdclip: warning: ranks or workers changed since the checkpoint ({data.get('world_size')} x "
                    f"{data.get('workers')} -> {world} x {cfg.workers}); the data stream restarts its epoch, so the "
                    f"{seen:,} samples of it already seen are seen again")
        position = {}
    log.info(f"psdclip: resuming from {path} (step {state['step']})")
    return int(state["step"]), position, state.get("teacher")


def _nan_diagnostics(cfg, step, logs, lr, model, batch):
    path = os.path.join(cfg.out, f"nan_step_{step:06d}.json")
    with open(path, "w") as f:
        json.dump({"step": step, "losses": {k: float(v) for k, v in logs.items()}, "lr": lr, "logit_scale": float(model.logit_scale.detach()),
                   "batch_keys": batch.get("keys", [])[:64],
                   "nonfinite_params": [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]},
                  f, indent=2)
    raise PsdclipError(f"non-finite loss at step {step}; diagnostics in {path} (use --nan-policy skip to go on)")


def _make_teacher(model, state=None):
    """A frozen copy of the model (EMA or snapshot teacher); a resumed run continues the teacher it saved."""
    import copy

    teacher = copy.deepcopy(model).eval()
    if state is not None:
        teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def _ema_update(ema, model, decay):
    """teacher = decay·teacher + (1 − decay)·model, for the parameters and the finite entries of floating-point
    buffers (batch-norm statistics: the teacher runs in eval mode and needs them); other buffers and entries (the
    text tower's causal mask holds -inf, which 0·(-inf) would turn into NaN at decay 0) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point() and decay > 0.0:
            e.copy_(torch.where(torch.isfinite(b), e * decay + b * (1 - decay), b))
        else:
            e.copy_(b)


@torch.no_grad()
def _ema_logits(ema, loss_fn, micro_batches):
    """The EMA/snapshot teacher's logits over the whole (accumulated) batch, gathered across ranks like the
    student's."""
    with torch.no_grad():
        outs = [ema(images, texts) for images, texts in micro_batches]
        return loss_fn.get_logits(torch.cat([o["image_features"] for o in outs]),
                                  torch.cat([o["text_features"] for o in outs]), outs[0]["logit_scale"])


def forward_backward(net, model, loss_fn, micro_batches, step, ema=None, world=1) -> dict:
    """Loss and gradients of one step over its micro-batches (call under the step's autocast); returns the
    losses, detached. One micro-batch: forward and backward. Several (`--accum K`): open_clip's feature-cache
    accumulation, so the contrastive loss (and PSD's teacher) sees the whole batch of K x micro rows, as one
    big batch would: the features of every micro-batch are first computed without gradients (batch-norm
    running statistics are put back after), then each micro-batch is run again with gradients and the loss
    of the whole batch is taken with its fresh features in place of its cached ones. The gradients summed
    over the K backward passes are those of the big batch; the logit scale, which every pass uses, takes
    its gradient from the last pass only (the one DDP reduces). Memory: the K micro-batches' inputs and features, and one
    micro-batch's activations."""
    teacher = _ema_logits(ema, loss_fn, micro_batches) if ema is not None else None
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        out = net(images, texts)
        losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], step=step,
                         teacher_logits=teacher)
        sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
        return {k: v.detach() for k, v in losses.items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        cached = [net(images, texts) for images, texts in micro_batches]
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    feats = {key: [c[key] for c in cached] for key in ("image_features", "text_features")}
    last = len(micro_batches) - 1
    for m, (images, texts) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if (world == 1 or m == last) else net.no_sync()
        with sync:
            out = net(images, texts)
            whole = {key: torch.cat(parts[:m] + [out[key]] + parts[m + 1:]) for key, parts in feats.items()}
            scale = out["logit_scale"] if m == last else out["logit_scale"].detach()
            losses = loss_fn(whole["image_features"], whole["text_features"], scale, step=step,
                             teacher_logits=teacher)
            sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
    return {k: v.detach() for k, v in losses.items()}
