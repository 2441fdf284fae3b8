"""PSD's teachers: the protocol every teacher follows, and the model teachers: a frozen copy of the model that follows
it by EMA (--ema-teacher) or is replaced by it every --snapshot-every steps (PS-KD), or a frozen model of another
architecture (--distill-model); the teacher's logits over a step's whole batch.

A teacher (`Teacher`) gives, for each step, what the loss takes besides the student's features (teacher logits, or
ready targets) and what to do with the step's features once computed; observes the model after each step taken;
and says what goes into a checkpoint (state_dict, rank 0) and beside it (save, every rank). The other teachers:
the embedding bank (bank.py) and the oracle control (oracle.py). The same-pass teacher is no object: the loss uses
its own logits."""
from __future__ import annotations

import abc
import dataclasses

import torch

from ..core.errors import InputError
from .loading import load_pretrained
from .models import build_model, resolve_model_name


@dataclasses.dataclass
class TeacherContext:
    """What a teacher is built from (objectives' `teacher`): the run's config, the student model, the device, the data
    stream (sample ids for the bank), this rank, the step the run starts at and the teacher state its checkpoint
    saved (None: a fresh run)."""
    cfg: object
    model: torch.nn.Module
    device: torch.device
    stream: object = None
    rank: int = 0
    start_step: int = 0
    saved: dict | None = None


class Teacher(abc.ABC):
    """The protocol of PSD's teachers (a base with the defaults: nothing to observe, nothing to save)."""

    @abc.abstractmethod
    def for_step(self, model, loss_fn, keys, ids, world: int, device):
        """(teacher, on_features) for train.loop.forward_backward: teacher(micro_batches) -> the loss's teacher
        arguments ({"teacher_logits": ...} or {"teacher_targets": ...}), taken before the step's forward passes;
        on_features(image, text), the step's features (None: not needed). `keys`, `ids`: the step's samples on this
        rank."""

    def after_step(self, model, step: int) -> None:
        """Observe the model after a step that was taken (`step`: its index)."""

    def state_dict(self) -> dict | None:
        """What goes into the checkpoint (rank 0); None: nothing."""
        return None

    def save(self, step: int, keep_steps: set[int]) -> None:
        """Write what is kept beside the checkpoint of `step` (every rank); `keep_steps`: the checkpoints kept."""


class ModelTeacher(Teacher):
    """A frozen model as teacher: its logits over the whole batch. `every` N steps (EMA: 1; snapshot: N; an external
    model: 0, never) it moves towards the student: teacher = decay·teacher + (1 − decay)·student (a snapshot: decay
    0, a copy). An EMA or snapshot teacher is saved in the checkpoint; an external one is rebuilt from its file."""

    def __init__(self, frozen, decay: float = 0.0, every: int = 0, saved: bool = False):
        self.frozen, self.decay, self.every, self.saved = frozen, decay, every, saved

    @classmethod
    def copy_of(cls, model, state=None, decay: float = 0.0, every: int = 1) -> "ModelTeacher":
        return cls(make_teacher(model, state), decay=decay, every=every, saved=True)

    def for_step(self, model, loss_fn, keys, ids, world, device):
        return model_teacher(self.frozen, loss_fn), None

    def after_step(self, model, step: int) -> None:
        if self.every and (step + 1) % self.every == 0:
            ema_update(self.frozen, model, self.decay)

    def state_dict(self) -> dict | None:
        return self.frozen.state_dict() if self.saved else None


def model_teacher(frozen, loss_fn):
    """A frozen model (EMA, snapshot, --distill-model) as forward_backward's teacher: its logits over the batch."""
    return lambda micro_batches: {"teacher_logits": teacher_logits(frozen, loss_fn, micro_batches)}


def make_teacher(model, state=None):
    """A frozen copy of the model (EMA or snapshot teacher); a resumed run continues the teacher it saved."""
    import copy

    teacher = copy.deepcopy(model).eval()
    if state is not None:
        teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(ema, model, decay):
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
def teacher_logits(ema, loss_fn, micro_batches):
    """The EMA/snapshot teacher's logits over the whole (accumulated) batch, gathered across ranks like the
    student's."""
    with torch.no_grad():
        outs = [ema(images, texts) for images, texts in micro_batches]
        return loss_fn.get_logits(torch.cat([o["image_features"] for o in outs]),
                                  torch.cat([o["text_features"] for o in outs]), outs[0]["logit_scale"])


class ExternalTeacher(torch.nn.Module):
    """A frozen model of another architecture as PSD's teacher (`--distill-model`, `--distill-pretrained`, open_clip's
    flags): it sees the student's batch, adapted to its own inputs (images resized on the device to its size and
    re-normalised to its mean and std; the student's tokens padded or cut to its context length, the end-of-text
    token kept last, which works for every model on open_clip's default BPE tokenizer), and its logits become the
    soft targets of `--loss psd` (targets (1 - alpha) onehot + alpha softmax(teacher / T)). It adds one forward pass
    of the teacher per step, without gradients, and is never saved in a checkpoint (its file is)."""

    def __init__(self, model, image_size, mean, std, context_length, student_mean, student_std):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_size = tuple(image_size)
        self.context_length = int(context_length)
        shape = (1, 3, 1, 1)
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std, as one scale and shift
        scale = torch.tensor(student_std).view(shape) / torch.tensor(std).view(shape)
        shift = (torch.tensor(student_mean).view(shape) - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def train(self, mode: bool = True):  # always frozen, in eval mode (batch-norm statistics are its own)
        return super().train(False)

    def adapt_text(self, texts: torch.Tensor) -> torch.Tensor:
        n = texts.shape[1]
        if n == self.context_length:
            return texts
        if n < self.context_length:
            return torch.nn.functional.pad(texts, (0, self.context_length - n))
        cut = texts[:, :self.context_length].clone()
        eot = texts.argmax(dim=-1)  # open_clip pools at the end-of-text token, the largest id
        lost = eot >= self.context_length
        cut[lost, -1] = texts[lost, eot[lost]]
        return cut

    @torch.no_grad()
    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        if tuple(images.shape[-2:]) != self.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=self.image_size, mode="bilinear",
                                                     antialias=True, align_corners=False)
        images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        return self.model(images.contiguous(memory_format=torch.channels_last), self.adapt_text(texts))


def external_teacher(cfg, student, device) -> ExternalTeacher:
    """The frozen `--distill-model` with the `--distill-pretrained` weights, on `device`, for `student`."""
    import open_clip

    arch = resolve_model_name(cfg.distill_model)
    model, _, _, tokenizer = build_model(arch, device)
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise InputError(f"--distill-model {cfg.distill_model}: its tokenizer ({type(tokenizer).__name__}) is not "
                         "open_clip's default BPE tokenizer, which the student's tokens are in")
    load_pretrained(model, cfg.distill_pretrained, arch, flag="--distill-pretrained")
    return wrap_teacher(model, student).to(device)


def wrap_teacher(model, student) -> ExternalTeacher:
    """open_clip `model` as a teacher of open_clip `student`: image size, mean and std from each model's own
    preprocessing config (open_clip.get_model_preprocess_cfg), the teacher's context length."""
    import open_clip

    mine, theirs = open_clip.get_model_preprocess_cfg(model), open_clip.get_model_preprocess_cfg(student)
    size = mine["size"] if isinstance(mine["size"], (tuple, list)) else (mine["size"], mine["size"])
    return ExternalTeacher(model.to(memory_format=torch.channels_last), size, mine["mean"], mine["std"],
                           model.context_length, theirs["mean"], theirs["std"])
