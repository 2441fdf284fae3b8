"""PSD's model teachers: a frozen copy of the model that follows it by EMA (--ema-teacher) or is replaced by it every
--snapshot-every steps (PS-KD), and the teacher's logits over a step's whole batch."""
from __future__ import annotations

import torch


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

    from ..core.errors import InputError
    from .loading import load_pretrained
    from .models import build_model, resolve_model_name

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
