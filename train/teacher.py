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
