"""The typed configs of `psdclip train` and `export` (one dataclass each, a help text per
field, validated on creation). Light: no torch or open_clip, so the CLI builds its options at once."""
from __future__ import annotations

import dataclasses
import functools
import os

from dataclasses import dataclass, field
import typing
from typing import Literal

from ..core.errors import InputError
from ..core.options import option as _help

from . import objectives


# What a resumed run may change: how it runs, logs and stops, never what it trains (the model, loss and its
# parameters, schedule, batch, data, starting weights, locks: a resume with any of those changed is refused)
RESUMABLE = frozenset({"out", "steps", "stop_after", "workers", "threads", "progress", "log_every", "report_to",
                       "eval_every", "eval_suite", "checkpoint_every", "keep", "resume", "device", "dist_timeout",
                       "dist_backend", "remote_sync", "compile", "channels_last", "grad_checkpointing", "nan_policy"})


# options whose default changed, with the default before (a run folder trained with the old one keeps it): the PSD
# defaults chosen by the psd-v2 studies (issue 26; README, "CLIP vs PSD")
CHANGED_DEFAULTS = {"teacher_temperature": 1.0}


def keep_earlier_defaults(cfg, earlier: dict) -> list[str]:
    """A run resumed with an option left at a default that has changed since the run began keeps the run's value
    (from its config.yaml; the old default when the run predates the option): `--flag value` of each one kept.
    Options named on the command line or in a --config file (cfg._given, set by build_config) are the user's."""
    given = getattr(cfg, "_given", frozenset())
    kept = []
    for name, old in CHANGED_DEFAULTS.items():
        if name in given:
            continue
        value = earlier.get(name, old)
        if value != getattr(cfg, name):
            setattr(cfg, name, value)
            kept.append(f"--{name.replace('_', '-')} {value}")
    return kept


def read_run_config(path: str) -> dict:
    """A run's config.yaml as the mapping it must be; damaged (invalid YAML, not a mapping) is one line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputError(f"{path}: cannot read the run's config ({' '.join(str(err).split())[:160]}); restore it, "
                         f"or train into another --out") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{path}: the run's config is not a mapping of options (a {type(doc).__name__}); restore "
                         f"it, or train into another --out")
    return doc


def changed_on_resume(before: dict, cfg) -> list[str]:
    """`--flag old -> new` for every option outside RESUMABLE whose value differs from the run's earlier config
    (options the earlier run did not have yet are not compared)."""
    now = dataclasses.asdict(cfg)
    out = []
    for name, value in now.items():
        if name in RESUMABLE or name not in before:
            continue
        old = before[name]
        if name == "data" and isinstance(old, str) and isinstance(value, str) and "://" not in value:
            old, value = os.path.abspath(old), os.path.abspath(value)
        if old != value:
            out.append(f"--{name.replace('_', '-')} {before[name]} -> {now[name]}")
    return out


@functools.lru_cache(maxsize=None)
def _choices(cls) -> dict:
    """{field: its Literal choices} of a dataclass (its type hints resolved once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


MAX_LR = 100.0  # the largest --lr accepted
MAX_PER_CORE = 8  # --threads and --workers: at most this many per core of the machine


@dataclass
class TrainConfig:
    """psdclip train: CLIP, PSD or SigLIP on streamed shards (alone or under torchrun)."""

    data: str = _help("a dataset directory, DATASET/subsets/NAME.json, or shard URLs (brace patterns, fsspec, pipe:)",
                      default="")
    out: str = _help("run directory (config.yaml, checkpoints/, metrics.jsonl, plots/)", default="")
    model: str = _help("tiny, rn-small, RN50, ViT-B-32, any open_clip model name, or a JSON model config path",
                       default="tiny")
    loss: Literal["clip", "psd", "siglip"] = _help(
        "clip: symmetric InfoNCE; psd: progressive self-distillation; siglip: the sigmoid loss (open_clip's "
        "SigLipLoss, --siglip there), with a learnt logit bias", default="psd")
    steps: int = _help("optimizer steps", default=1000)
    batch_size: int = _help("global batch size (split evenly over the ranks)", default=128)
    accum: int = _help("gradient accumulation: micro-batches per step; the loss sees the whole batch (features are "
                       "cached, as open_clip's --accum-freq does), memory holds one micro-batch's activations", default=1)
    lr: float = _help("peak learning rate", default=5e-4)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=0.0)
    warmup: float = _help("linear warm-up: steps, or a fraction of --steps when below 1 (0.05: the first 5%%)",
                          default=100)
    weight_decay: float = _help("AdamW weight decay (not applied to norms, biases and the logit scale)", default=0.2)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.98)
    eps: float = _help("AdamW epsilon", default=1e-6)
    grad_clip: float = _help("clip the gradient norm to this (0: off)", default=1.0)
    alpha_start: float = _help("PSD: distillation weight at step 0", default=0.0)
    alpha_max: float = _help("PSD: distillation weight at the last step (the value every PSD reading of the psd-v2 "
                             "studies used; README)", default=0.5)
    alpha_schedule: Literal["linear", "cosine", "constant"] = _help("PSD: shape of the alpha schedule",
                                                                    default="linear")
    rho_start: float = _help("PSD: fraction of rows given soft targets at step 0", default=1.0)
    rho_end: float = _help("PSD: fraction of rows given soft targets at the last step", default=1.0)
    rho_schedule: Literal["linear", "cosine", "constant"] = _help("PSD: shape of the rho schedule", default="constant")
    teacher_temperature: float = _help(
        "PSD: temperature applied to the teacher's logits. Default 2, from the psd-v2 studies (README, 'CLIP vs "
        "PSD'): at 1 the same-pass teacher only rescales CLIP's gradient; no PSD reading beat CLIP there, and T = 2 "
        "had the best mean rank of those that differ from it over both (tied with rho 0.5 at T = 2, the real-image "
        "study breaking the tie): not a measured gain (a run begun with another default keeps its own)", default=2.0)
    ema_teacher: bool = _help("PSD: use an EMA copy of the model as teacher (one more forward pass)", default=False)
    ema_decay: float = _help("PSD: decay of the EMA teacher", default=0.999)
    snapshot_every: int = _help("PSD: PS-KD's previous-epoch teacher: a frozen copy of the model, refreshed every N "
                                "steps (one more forward pass; 0: off)", default=0)
    bank_teacher: bool = _help("PSD: PS-KD's previous-epoch teacher at no added forward pass: an embedding bank of "
                               "each sample's image and text embedding from the last step that saw it (RUN/bank/, "
                               "memory-mapped fp16, 4 x embed-dim bytes a sample, saved with each checkpoint); a "
                               "sample not seen yet keeps one-hot. Needs a psdclip dataset or subset as --data",
                               default=False)
    oracle_targets: str = _help("PSD, a control (not a method): soft targets from the ground truth: a Parquet or CSV "
                                "file of key, image_group, text_group (a sample's image and its caption's meaning); "
                                "a row's target mass alpha is spread over the in-batch items whose group matches "
                                "(the ceiling of any teacher where the truth is known; `psdclip data oracle` writes "
                                "the file for the synthetic and emoji sources)", default="")
    label_smoothing: float = _help("CLIP, a control: each row's target (1 - eps) onehot + eps / B over the batch "
                                   "(the standard soft-target baseline; 0: off)", default=0.0)
    data_weights: list[float] = _help(
        "a weighted mixture of the --data sources joined by '::' (open_clip's --train-data A::B with "
        "--train-data-upsampling-factors): each sample's source drawn by these weights; without weights, datasets "
        "joined by '::' are mixed in proportion to their sizes; metrics.jsonl counts samples per source",
        default_factory=list)
    distill_model: str = _help("PSD: a frozen teacher of another architecture (open_clip's --distill-model): any "
                               "--model name; its logits are PSD's soft targets (needs --loss psd and "
                               "--distill-pretrained; one more forward pass, no gradients)", default="")
    distill_pretrained: str = _help("PSD: the teacher's weights (open_clip's --distill-pretrained): a psdclip run or "
                                    "checkpoint, an export or open_clip checkpoint, or a pretrained tag", default="")
    pretrained: str = _help("fine-tune: start from these weights: a psdclip run or checkpoint, a file written by "
                            "`psdclip export` (any open_clip checkpoint of --model), or an open_clip pretrained tag "
                            "(downloaded where its hub is reachable); a resumed run continues from its own checkpoint",
                            default="")
    lock_image: bool = _help("fine-tune: freeze the image tower (LiT)", default=False)
    lock_image_unlocked_groups: int = _help("fine-tune: leave the last N layer groups of a locked image tower "
                                            "trainable", default=0)
    lock_image_freeze_bn_stats: bool = _help("fine-tune: also freeze the BatchNorm statistics of a locked image "
                                             "tower", default=False)
    lock_text: bool = _help("fine-tune: freeze the text tower", default=False)
    lock_text_unlocked_layers: int = _help("fine-tune: leave the last N layers of a locked text tower trainable",
                                           default=0)
    grad_checkpointing: bool = _help("recompute the towers' activations in the backward pass (less memory, ~30%% "
                                     "more compute; transformer towers only: open_clip's ModifiedResNet has none)",
                                     default=False)
    seed: int = _help("random seed (model init, data order, PSD row choice)", default=0)
    workers: int = _help("DataLoader worker processes per rank", default=2)
    threads: int = _help("compute threads of a CPU run (0: torch's default, one per core). A model whose loader "
                         "workers are busy runs faster on the cores they leave: rn-small at batch 256 on 2 cores "
                         "beside 1 loader worker, 583 samples/s with 1 thread against 335 with 2 (less at smaller "
                         "batches); tiny, whose compute dwarfs its loading, runs slower (68 against 109). Speed only: "
                         "a run resumes with any value (equal up to float rounding)", default=0)
    shuffle_buffer: int = _help("samples in the shuffle buffer of each reader", default=1000)
    resampled: bool = _help("draw shards with replacement (for runs far longer than one pass)", default=False)
    follow: bool = _help("pick up shards that the pipeline publishes while training runs", default=False)
    skip_missing_shards: bool = _help("train on the shards that are there when some the dataset or subset names are "
                                      "missing (default: an error)", default=False)
    precision: Literal["auto", "fp32", "bf16", "amp_bf16", "amp_bfloat16", "amp", "fp16"] = _help(
        "autocast: auto = bf16 on CUDA, fp32 on CPU; bf16 (open_clip's amp_bf16); amp or fp16 = fp16 autocast "
        "with a GradScaler (CUDA only: for GPUs without bf16; a step whose gradients overflow is skipped and "
        "counted in skipped_steps)", default="auto")
    compile: bool = _help("torch.compile the model", default=False)
    channels_last: bool = _help("keep images and convolution weights in channels-last (NHWC) memory: ~1.4x the "
                                "samples/s of a convolutional tower on CPU (oneDNN), also faster on GPUs",
                                default=True)
    log_every: int = _help("log metrics every N steps", default=10)
    report_to: str = _help("also report the logged metrics to: tensorboard (event files in RUN/tensorboard), wandb, "
                           "or both (comma-separated); metrics.jsonl is always written", default="")
    eval_every: int = _help("evaluate on --eval-suite every N steps (and at the end) while training; the results "
                            "go into metrics.jsonl as rows with an `eval` key (0: off)", default=0)
    eval_suite: str = _help("the suite of --eval-every, as `psdclip eval --suite` takes it (a synthetic suite is "
                            "evaluated on its validation split)", default="")
    checkpoint_every: int = _help("write a checkpoint every N steps (and at the end)", default=100)
    keep: int = _help("checkpoints kept (the newest)", default=3)
    resume: str = _help("auto: continue from RUN/checkpoints when present; never; or a checkpoint path",
                        default="auto")
    stop_after: int = _help("stop after this many steps in this invocation, with a checkpoint (0: run to --steps); "
                            "for time-limited jobs", default=0)
    nan_policy: Literal["stop", "skip"] = _help("on a non-finite loss: stop (after saving diagnostics) or skip the step",
                                                default="stop")
    device: str = _help("auto, cpu or cuda[:N]", default="auto")
    dist_timeout: float = _help("minutes a rank waits for the others in a collective before the job fails (torchrun)",
                                default=30.0)
    remote_sync: str = _help("copy checkpoints, metrics and plots to this fsspec URL as they are written "
                             "(open_clip's --remote-sync; s3://, gs://, ...); a run whose --out has no checkpoint "
                             "resumes from the remote copy", default="")
    dist_backend: Literal["auto", "nccl", "gloo"] = _help(
        "process-group backend under torchrun (open_clip's --dist-backend): auto = NCCL on CUDA, gloo on CPU; gloo "
        "on CUDA lets several ranks share one GPU (NCCL refuses that)", default="auto")
    progress: bool = _help("show a progress bar", default=True)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else round(self.warmup * self.steps)

    def __post_init__(self):
        for name, choices in _choices(TrainConfig).items():  # the CLI checks these; a config made in Python here
            if getattr(self, name) not in choices:
                raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got "
                                 f"{getattr(self, name)!r}")
        if not self.data:
            raise InputError("--data: a dataset directory, subset file or shard URLs is required")
        if not self.out:
            raise InputError("--out: a run directory is required")
        for name in ("steps", "batch_size", "accum", "log_every", "checkpoint_every", "keep", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or not self.warmup >= 0 or self.stop_after < 0 or self.threads < 0:
            raise InputError("--workers, --threads, --warmup and --stop-after must be >= 0")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise InputError(f"--lr must be > 0 and 0 <= --min-lr <= --lr (got {self.lr}, {self.min_lr})")
        if not self.lr <= MAX_LR:  # AdamW's step is lr-sized: beyond this the weights leave the floats in a step
            raise InputError(f"--lr {self.lr:g}: at most {MAX_LR:g} (a learning rate that large diverges at once)")
        machine = os.cpu_count() or 1
        for name in ("threads", "workers"):  # torch segfaults at --threads 100000; a million loader processes hang
            if getattr(self, name) > MAX_PER_CORE * machine:
                raise InputError(f"--{name} {getattr(self, name)}: at most {MAX_PER_CORE} per core of this machine "
                                 f"({MAX_PER_CORE * machine} on its {machine} cores)")
        for name in ("alpha_start", "alpha_max", "rho_start", "rho_end", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0 or not self.eps > 0:
            raise InputError(f"--weight-decay and --grad-clip must be >= 0 and --eps > 0 (got {self.weight_decay}, "
                             f"{self.grad_clip}, {self.eps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise InputError(f"--beta1 and --beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not 0 < self.dist_timeout <= 1e6:  # (a timedelta of more overflows)
            raise InputError(f"--dist-timeout must be in (0, 1e6] minutes, got {self.dist_timeout}")
        if self.lock_image_unlocked_groups < 0 or self.lock_text_unlocked_layers < 0:
            raise InputError("--lock-image-unlocked-groups and --lock-text-unlocked-layers must be >= 0")
        objectives.check(self)  # the objective's own options (train/objectives/)
        unknown = {k.strip() for k in self.report_to.split(",") if k.strip()} - {"tensorboard", "wandb"}
        if unknown:
            raise InputError(f"--report-to {self.report_to!r}: expected tensorboard, wandb or both, comma-separated")
        if self.eval_every < 0 or (self.eval_every and not self.eval_suite):
            raise InputError("--eval-every N needs N >= 0 and an --eval-suite")


@dataclass
class ExportConfig:
    """psdclip export: write an open_clip checkpoint (state_dict) and its model config beside it."""

    run: str = field(default="", metadata={"help": "run directory or checkpoint file", "positional": True})
    out: str = field(default="", metadata={"help": "output .pt file"})
    force: bool = field(default=False, metadata={"help": "replace an existing export (FILE.pt and FILE.json)"})

    def __post_init__(self):
        if not self.run or not self.out:
            raise InputError("usage: psdclip export RUN_OR_CHECKPOINT --out FILE.pt")
