"""The training loop: `psdclip train`, alone or under torchrun (DDP; NCCL on GPU, gloo on CPU).

It reads top to bottom: set-up, resume, then for each step the learning rate from lr_at(step), forward,
the loss module's named losses, backward, clip, step, log, checkpoint. Beside it: schedule.py (lr_at, parameter
groups), distributed.py (process group, decisions ranks take together), checkpoint.py (the checkpoint format,
writing and resuming), reporting.py (progress, metrics.jsonl, TensorBoard / W&B, in-training eval), teacher.py
(PSD's EMA and snapshot teachers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist
import yaml

from ..core.errors import InputError, PsdclipError
from ..core.io import now, write_json, write_text
from ..core.locks import folder_lock
from . import checkpoint as ckpt
from .config import TrainConfig, keep_earlier_defaults, read_run_config
from .data import ShardStream, changed_data, make_loader
from .distributed import Interrupt, setup_distributed, step_flags
from .loading import load_pretrained
from .models import build_model, resolve_model_name
from .objectives import objective_of
from .remote import RemoteSync
from .reporting import Evaluator, Reporter, Window, log_row, progress_bar
from .schedule import lr_at, param_groups
from .teacher import Teacher, TeacherContext

log = logging.getLogger(__name__)

PLOT_EVERY_S = 120.0


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
        if type(model.visual).__name__ == "ModifiedResNet":  # open_clip's ModifiedResNet has none: say so
            log.warning("psdclip: warning: --grad-checkpointing: the image tower (open_clip's ModifiedResNet) has no "
                        "gradient checkpointing; only the text tower recomputes its activations")


def train(cfg: TrainConfig, evaluate=None) -> dict:
    """Train as `cfg` says. `evaluate(loaded_model) -> {metric: value}`: --eval-every's evaluation (the evaluation
    stage's `in_training(suite)`, given by the caller); needed when cfg.eval_every is set."""
    if cfg.eval_every and evaluate is None:
        raise ValueError("train: --eval-every needs the evaluation (train(cfg, evaluate=...))")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out}: is a file, not a run folder")
    rank, world, device = setup_distributed(cfg)
    before = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.threads and rank == 0:  # accepted for a shared recipe, and said to do nothing here
        log.warning(f"psdclip: warning: --threads {cfg.threads} sets the compute threads of a CPU run; on {device} "
                    f"it does nothing")
    # one training per run folder: a second `psdclip train --out RUN` is refused while one runs (rank 0 holds it)
    lock = folder_lock(os.path.join(cfg.out, "train.lock"), f"--out {cfg.out}: another `psdclip train` ({{holder}}) "
                       f"is training into this run folder; wait for it, or use another --out") if rank == 0 else \
        contextlib.nullcontext()
    try:
        with lock:
            return _train(cfg, rank, world, device, evaluate)
    finally:
        torch.set_num_threads(before)  # a caller in the same process (a sweep, a test) keeps its own setting


def _train(cfg: TrainConfig, rank: int, world: int, device, evaluate) -> dict:
    if cfg.batch_size % (world * cfg.accum):
        raise InputError(f"--batch-size {cfg.batch_size} must divide evenly over {world} rank(s) x {cfg.accum} "
                         f"micro-batches")
    micro = cfg.batch_size // world // cfg.accum
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    earlier = os.path.join(cfg.out, "config.yaml")
    before = read_run_config(earlier) if cfg.resume != "never" and os.path.isfile(earlier) else {}
    if before:  # before the loss is made: it reads them
        kept = keep_earlier_defaults(cfg, before)
        if kept and rank == 0:
            log.info(f"psdclip: {cfg.out} was begun with {', '.join(kept)}, a default that has changed since: kept "
                     f"(name the option to train with another value)")
    torch.manual_seed(cfg.seed)
    objective = objective_of(cfg)
    model, preprocess_train, preprocess_val, tokenizer = build_model(cfg.model, device, **objective.model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    loss_fn = objective.make_loss(cfg, rank, world)
    _fine_tuning_options(model, cfg)  # before the optimizer: it takes the parameters that still train
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    amp_dtype = autocast_dtype(cfg.precision, device)
    # fp16 (open_clip's `amp`) scales the loss so that small gradients do not underflow; bf16 and fp32 need none
    # (the disabled scaler is kept for the checkpoint's format)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_step, data_position, teacher_state = 0, {}, None
    remote = _remote_sync(cfg, ckpt_dir, rank, world)
    resumed = ckpt.resume(cfg, ckpt_dir, model, optimizer, scaler, world, rank)
    if resumed:
        start_step, data_position, teacher_state = resumed.step, resumed.data["position"], resumed.teacher
    elif cfg.pretrained:  # a resumed run continues from its own weights
        source = load_pretrained(model, cfg.pretrained, resolve_model_name(cfg.model))
        if rank == 0:
            log.info(f"psdclip: starting from the weights of {source}")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    stream = ShardStream(cfg.data, micro, preprocess_train, tokenizer, seed=cfg.seed, rank=rank, world_size=world,
                         shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, follow=cfg.follow,
                         resume=data_position, skip_missing=cfg.skip_missing_shards,
                         weights=cfg.data_weights or None, with_ids=cfg.bank_teacher)
    if stream.source.samples is not None and micro * world > stream.source.samples:
        raise InputError(f"--batch-size {cfg.batch_size}: larger than the {stream.source.samples:,} samples of "
                         f"--data {cfg.data} (a contrastive batch would hold the same pair twice)")
    identity = None if stream.parts else stream.source.identity
    changed = changed_data(before.get("data_identity"), identity, cfg.data) if resumed else None
    if changed:
        raise InputError(changed)
    if rank == 0:
        ckpt.truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), start_step)
        if cfg.warmup_steps > cfg.steps:
            log.warning(f"psdclip: warning: --warmup {cfg.warmup:g} is {cfg.warmup_steps} steps, more than --steps "
                        f"{cfg.steps}: the learning rate never reaches --lr {cfg.lr:g}")
        os.makedirs(os.path.join(cfg.out, "plots"), exist_ok=True)
        resolved = {**dataclasses.asdict(cfg), "model_arch": resolve_model_name(cfg.model), "world_size": world,
                    "data_identity": identity}
        write_text(os.path.join(cfg.out, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
        with open(os.path.join(cfg.out, "config_history.jsonl"), "a") as f:  # every start of the run, oldest first
            f.write(json.dumps({"started_at": now(), "step": start_step, "config": resolved}) + "\n")
    teacher: Teacher | None = objective.teacher(TeacherContext(cfg, model, device, stream, rank, start_step,
                                                               teacher_state)) if objective.teacher else None
    batches = iter(make_loader(stream, cfg.workers))
    bar = progress_bar(cfg, rank, start_step)
    state = TrainState(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler, teacher=teacher, rank=rank,
                       world=world, remote=remote, window=Window(first_step=start_step), position=dict(data_position),
                       reporter=Reporter(cfg) if rank == 0 else None)
    evaluator = Evaluator(cfg, model, preprocess_val, tokenizer, device, evaluate) if cfg.eval_every and rank == 0 \
        else None
    step = start_step
    end = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)
    interrupt = Interrupt()
    last_plot = time.time()
    for step in range(start_step, end):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        at_step_start = dict(state.position)
        micro_batches, step_keys, step_ids = [], [], []
        for _ in range(cfg.accum):
            t_wait = time.time()
            try:
                batch = _next_batch(batches)
            except _WorkerEnded as err:
                if not interrupt.wait(2.0):  # no stop signal came with it: a worker died on its own
                    raise PsdclipError(f"{err}; the same command resumes from the last checkpoint") from None
                # the steps done so far are whole: keep them. Alone only: ranks whose workers are still alive are
                # in other collectives (their next step's), so a checkpoint's gather here would hang them; several
                # ranks stop at the last periodic checkpoint
                if step > start_step and world == 1:
                    ckpt.write(state, step, at_step_start)
                    state.writer.wait()
                log.warning(f"psdclip: {interrupt.name} at step {step}: checkpoint saved; the same command resumes "
                         f"from it")
                raise KeyboardInterrupt from None
            state.window.wait += time.time() - t_wait
            state.position[str(batch["reader"])] = batch["position"]
            if stream.parts:  # a mixture: samples per source in this log interval
                state.window.sources = [a + b for a, b in zip(state.window.sources or [0] * len(batch["sources"]),
                                                              batch["sources"])]
            state.skipped_samples[batch["reader"]] = batch["skipped"]
            micro_batches.append((batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format),
                                  batch["text"].to(device, non_blocking=True)))
            step_keys += batch["keys"]
            step_ids.append(batch["ids"])
            state.window.samples += batch["image"].shape[0] * world
        teach, keep = teacher.for_step(model, loss_fn, step_keys, torch.cat(step_ids), world, device) \
            if teacher is not None else (None, None)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            losses = forward_backward(net, model, loss_fn, micro_batches, step, teacher=teach, world=world,
                                      scaler=scaler, on_features=keep)
        finite, stop_asked = step_flags(sum(v for k, v in losses.items() if k.endswith("_loss")), bool(interrupt.name),
                                        world)
        logs = {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}  # read on log steps only
        if not finite:
            if cfg.nan_policy == "stop":
                _nan_diagnostics(cfg, step, logs, lr, model, batch)
            optimizer.zero_grad(set_to_none=True)
            state.window.skipped_steps += 1
            log.warning(f"psdclip: warning: non-finite loss at step {step}; step skipped")
            continue
        taken = optimizer_step(model, optimizer, scaler, cfg.grad_clip, logs)
        optimizer.zero_grad(set_to_none=True)
        if not taken:  # fp16 gradients overflowed: the scaler skipped the step and lowered its scale
            state.window.skipped_steps += 1
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if taken and teacher is not None:
            teacher.after_step(model, step)  # EMA: moves; snapshot: becomes the model every N steps
        done = step + 1
        if stream.parts and (done % cfg.log_every == 0 or done == cfg.steps):
            # every rank's counts, on log steps only (one small all-reduce), for metrics.jsonl's source_samples
            counts = torch.tensor(state.window.sources or [0] * len(stream.parts), dtype=torch.long, device=device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            state.window.source_samples = dict(zip(stream.parts, counts.tolist()))
            state.window.sources = []
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            log_row(state, done, logs, lr, bar, total_steps=end)
        if evaluator is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            evaluator.run(state, done)
        stopping = stop_asked or (bool(interrupt.name) and world == 1)
        if stopping and not interrupt.name:
            interrupt.name = "a signal on another rank"
        if done % cfg.checkpoint_every == 0 or done == end or stopping:
            # plots with the checkpoint at the end, on a stop, and at most every PLOT_EVERY_S in between (drawing
            # five PNGs takes ~1 s: at every checkpoint of a short run it would cost more than the training)
            plot = done == end or stopping or time.time() - last_plot >= PLOT_EVERY_S
            ckpt.write(state, done, state.position, plot=plot)
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


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step (as open_clip's TrainState): the modules and optimizer, this
    rank's data position per reader, samples its readers skipped, and the log interval's counters."""
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    teacher: Teacher | None  # PSD's teacher (its checkpoint state and files)
    rank: int
    world: int
    window: Window
    position: dict = dataclasses.field(default_factory=dict)
    skipped_samples: dict = dataclasses.field(default_factory=dict)
    reporter: Reporter | None = None
    remote: object | None = None  # remote.RemoteSync of --remote-sync, on rank 0
    writer: ckpt.BackgroundWriter = dataclasses.field(default_factory=lambda: ckpt.BackgroundWriter())

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.out, "metrics.jsonl")


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


def _nan_diagnostics(cfg, step, logs, lr, model, batch):
    path = os.path.join(cfg.out, f"nan_step_{step:06d}.json")
    write_json(path, {"step": step, "losses": {k: float(v) for k, v in logs.items()}, "lr": lr,
                      "logit_scale": float(model.logit_scale.detach()), "batch_keys": batch.get("keys", [])[:64],
                      "nonfinite_params": [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]},
               indent=2)
    raise PsdclipError(f"non-finite loss at step {step}; diagnostics in {path} (use --nan-policy skip to go on)")


def _remote_sync(cfg: TrainConfig, ckpt_dir: str, rank: int, world: int):
    """--remote-sync: on a node whose --out has no checkpoint, the first local rank downloads the remote run's
    latest one before every rank resumes (remote.py). Returns the RemoteSync (None without the flag)."""
    if not cfg.remote_sync:
        return None

    local_first = int(os.environ.get("LOCAL_RANK", rank)) == 0
    # only rank 0 (which uploads) and each node's first rank (which may download) open the store
    sync = RemoteSync(cfg.remote_sync) if rank == 0 or local_first else None
    if local_first and cfg.resume == "auto" and not ckpt.list_checkpoints(ckpt_dir):
        sync.pull(cfg.out)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return sync if rank == 0 else None


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of `--precision` on `device` (None: fp32). fp16 needs CUDA: its loss scaling is for GPUs
    without bf16 (pre-Ampere), and a CPU run uses fp32 or bf16."""
    if precision in ("amp", "fp16"):
        if torch.device(device).type != "cuda":
            raise InputError(f"--precision {precision}: fp16 with loss scaling runs on CUDA only; on {device} use "
                             "fp32 or bf16")
        return torch.float16
    if precision in ("bf16", "amp_bf16", "amp_bfloat16") or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def optimizer_step(model, optimizer, scaler, grad_clip: float, logs: dict) -> bool:
    """Clip the gradient norm and take the optimizer step. With loss scaling (fp16) the gradients are unscaled
    first, and the scaler skips a step whose gradients overflowed, then lowers its scale (as GradScaler does in
    open_clip): returns whether the step was taken (the scale after it goes into logs["loss_scale"])."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    logs["loss_scale"] = scaler.get_scale()
    return logs["loss_scale"] >= before


def forward_backward(net, model, loss_fn, micro_batches, step, teacher=None, world=1, scaler=None,
                     on_features=None) -> dict:
    """Loss and gradients of one step over its micro-batches (call under the step's autocast); returns the
    losses, detached. One micro-batch: forward and backward. Several (`--accum K`): open_clip's feature-cache
    accumulation, so the contrastive loss (and PSD's teacher) sees the whole batch of K x micro rows, as one
    big batch would: the features of every micro-batch are first computed without gradients (batch-norm
    running statistics are put back after), then each micro-batch is run again with gradients and the loss
    of the whole batch is taken with its fresh features in place of its cached ones. The gradients summed
    over the K backward passes are those of the big batch; the logit scale, which every pass uses, takes
    its gradient from the last pass only (the one DDP reduces). Memory: the K micro-batches' inputs and features, and one
    micro-batch's activations. `scaler` (fp16): each backward pass runs on the scaled loss. `teacher(micro_batches)`:
    the loss's teacher arguments, taken before any forward pass; `on_features(image, text)`: the step's features
    (the whole local batch, detached), after them."""
    def backward(losses):
        loss = sum(v for k, v in losses.items() if k.endswith("_loss"))
        (scaler.scale(loss) if scaler is not None else loss).backward()

    given = teacher(micro_batches) if teacher is not None else {}
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        out = net(images, texts)
        losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], step=step,
                         logit_bias=out.get("logit_bias"), **given)
        backward(losses)
        if on_features is not None:
            on_features(out["image_features"], out["text_features"])
        return {k: v.detach() for k, v in losses.items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        cached = [net(images, texts) for images, texts in micro_batches]
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    feats = {key: [c[key] for c in cached] for key in ("image_features", "text_features")}
    if on_features is not None:
        on_features(torch.cat(feats["image_features"]), torch.cat(feats["text_features"]))
    last = len(micro_batches) - 1
    for m, (images, texts) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if (world == 1 or m == last) else net.no_sync()
        with sync:
            out = net(images, texts)
            whole = {key: torch.cat(parts[:m] + [out[key]] + parts[m + 1:]) for key, parts in feats.items()}
            # the logit scale (and SigLIP's bias) take their gradient once, in the pass DDP reduces
            scale, bias = out["logit_scale"], out.get("logit_bias")
            if m != last:
                scale, bias = scale.detach(), None if bias is None else bias.detach()
            losses = loss_fn(whole["image_features"], whole["text_features"], scale, step=step, logit_bias=bias,
                             **given)
            backward(losses)
    return {k: v.detach() for k, v in losses.items()}
