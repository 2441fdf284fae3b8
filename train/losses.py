"""Contrastive losses as small nn.Modules that return a dict of named losses (open_clip's style): the
trainer sums the `*_loss` entries and logs every entry. Both reuse open_clip's ClipLoss for the cross-rank
feature gather (local loss, gradients through the gathered features), so the teacher of PSD sees the
global batch.

PSD (progressive self-distillation): logits L = s·I·Tᵀ. The teacher is the detached softmax of the same
logits (row-wise for image→text, column-wise for text→image), optionally at a teacher temperature. For a
random subset of rows (fraction ρ) the target is (1−α)·onehot + α·teacher; the other rows keep one-hot.
The loss is the mean of the two cross-entropies. α (and ρ) follow pure schedule functions of the step.

Which teacher (the readings of the method that psdclip implements; train/loop.py builds the teacher model):
- same pass (default): the detached logits of this very forward pass, as the paper's abstract has it ("distills
  its own knowledge ... for a subset of images and captions in every minibatch", no added compute). At teacher
  temperature 1 and ρ = 1 a distilled row's gradient is (1 − α)·(p − y), CLIP's rescaled: temperature ≠ 1 or
  ρ < 1 is what makes it differ.
- EMA (`ema_teacher`): ALBEF's momentum distillation, a slowly moving average of the model (decay 0.99-0.999).
- snapshot (`snapshot_every`): PS-KD's progressive refinement, the model as it was one epoch (N steps) ago.
- embedding bank (`bank_teacher`): PS-KD's previous-epoch teacher at no added forward pass: each sample's image and
  text embedding from the last step that saw it (train/bank.py); the teacher logits of a batch are its samples'
  bank rows (a sample not seen yet keeps one-hot).
- oracle (`oracle_targets`, a control, not a method): the target mass spread over the in-batch items whose
  ground truth matches (train/oracle.py), the ceiling of any teacher where the truth is known.
Targets and the cross-entropy are computed in fp32 under any autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

SCHEDULES = ("linear", "cosine", "constant")


def ramp(step: int, total: int, start: float, end: float, kind: str = "linear") -> float:
    """A pure schedule from `start` at step 0 to `end` at step `total` (held after)."""
    if kind == "constant" or total <= 0:
        return float(end)
    t = min(max(step / total, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True, kw_only=True)
class PSDSchedule:
    total_steps: int
    alpha_start: float = 0.0
    alpha_max: float = 0.5
    alpha_schedule: str = "linear"
    rho_start: float = 1.0
    rho_end: float = 1.0
    rho_schedule: str = "constant"

    def alpha_at(self, step: int) -> float:
        return ramp(step, self.total_steps, self.alpha_start, self.alpha_max, self.alpha_schedule)

    def rho_at(self, step: int) -> float:
        return ramp(step, self.total_steps, self.rho_start, self.rho_end, self.rho_schedule)


def constant_schedule(alpha: float, rho: float = 1.0, total_steps: int = 10) -> PSDSchedule:
    """α and ρ held fixed (for tests and analyses of one training moment)."""
    return PSDSchedule(total_steps=total_steps, alpha_start=alpha, alpha_max=alpha, alpha_schedule="constant",
                       rho_start=rho, rho_end=rho, rho_schedule="constant")


class _FP32Logits:
    """Logits in fp32 whatever the autocast: under bf16 a logit near 100 (the logit scale's cap) rounds in steps of
    0.5, and the soft targets (PSD's teacher) would inherit that; the features are cast up before the product (and
    before the cross-rank gather: fp32 vectors, 2x the bytes of bf16, one batch of d-dim rows per rank)."""

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            return super().get_logits(image_features.float(), text_features.float(), logit_scale.float(),
                                      *(() if logit_bias is None else (logit_bias.float(),)))


class CLIPLoss(_FP32Logits, ClipLoss):
    """The symmetric InfoNCE loss of CLIP, returning {'contrastive_loss': …}. With `label_smoothing` ε (a
    control of the PSD study: the standard soft-target baseline) each row's target is (1 − ε)·onehot + ε/B over
    the B columns of the global batch (torch's cross_entropy label_smoothing)."""

    def __init__(self, rank: int = 0, world_size: int = 1, label_smoothing: float = 0.0):
        super().__init__(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
        self.label_smoothing = float(label_smoothing)

    def forward(self, image_features, text_features, logit_scale, step: int = 0, **_):  # noqa: D401
        if not self.label_smoothing:
            return {"contrastive_loss": super().forward(image_features, text_features, logit_scale)}
        logits_i, logits_t = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, logits_i.shape[0])
        eps = self.label_smoothing
        loss = (F.cross_entropy(logits_i, labels, label_smoothing=eps)
                + F.cross_entropy(logits_t, labels, label_smoothing=eps)) / 2
        return {"contrastive_loss": loss}


class SigLIPLoss(_FP32Logits, SigLipLoss):
    """open_clip's sigmoid loss (SigLIP, Zhai et al. 2023): every image-text pair of the batch is a binary
    match / no-match, -log sigmoid(label * (s * i.t + b)) summed over the pairs and divided by the batch size,
    with a learnt bias b (the model's `logit_bias`; `build_model(..., siglip=True)` initialises s = 10 and
    b = -10 as open_clip does). Across ranks, open_clip's bidirectional exchange: each rank's images meet every
    rank's texts, passed round the ranks with gradients. Returns {'contrastive_loss': ...}."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(cache_labels=True, rank=rank, world_size=world_size)

    def forward(self, image_features, text_features, logit_scale, step: int = 0, logit_bias=None, **_):  # noqa: D401
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs the model's logit_bias (a model built with siglip=True)")
        return {"contrastive_loss": super().forward(image_features, text_features, logit_scale, logit_bias)}


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, in fp32 whatever the autocast dtype (bf16 rounding would make the
    targets no longer sum to 1)."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class PSDLoss(_FP32Logits, ClipLoss):
    """Progressive self-distillation. Returns {'contrastive_loss', 'alpha', 'rho', 'distill_rows'}: the
    loss and, for logging, the schedule values and the fraction of rows given soft targets."""

    def __init__(self, schedule: PSDSchedule, teacher_temperature: float = 1.0, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
        self.schedule = schedule
        self.teacher_temperature = teacher_temperature
        self.seed = seed
        self._mask = (None, None)  # (key, mask): a step's micro-batches (--accum) share one draw and one copy

    def row_mask(self, step: int, global_rows: int, local_rows: int, rho: float, device) -> torch.Tensor:
        """Which local rows get soft targets: drawn over the global batch from (seed, step), so that one
        process and N processes pick the same rows."""
        if rho >= 1.0:
            return torch.ones(local_rows, dtype=torch.bool, device=device)
        key = (step, global_rows, local_rows, rho, str(device))
        if self._mask[0] != key:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            chosen = torch.rand(global_rows, generator=g) < rho
            start = self.rank * local_rows if self.world_size > 1 else 0
            self._mask = (key, chosen[start:start + local_rows].to(device, non_blocking=True))
        return self._mask[1]

    def forward(self, image_features, text_features, logit_scale, step: int = 0, teacher_logits=None,
                teacher_targets=None, **_):
        """teacher_logits: (image→text, text→image) logits of another teacher (EMA, snapshot, external, the
        embedding bank), each (local rows × global columns), replacing this pass's own; a row of the bank's that
        is −inf throughout (a sample not seen yet) keeps its one-hot target. teacher_targets: ready target
        distributions instead (the oracle: rows that sum to 0 keep one-hot), used without a temperature."""
        logits_i, logits_t = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, logits_i.shape[0])
        alpha = self.schedule.alpha_at(step)
        rho = self.schedule.rho_at(step)
        local = logits_i.shape[0]
        mask = self.row_mask(step, local * self.world_size, local, rho, logits_i.device)
        if teacher_targets is not None:
            p_i, p_t = (t.detach().float() for t in teacher_targets)
        else:
            t_i, t_t = teacher_logits if teacher_logits is not None else (logits_i, logits_t)
            p_i, p_t = (self.teacher_probs(t) for t in (t_i, t_t))
        target_i, rows_i = self._with_teacher(logits_i, p_i, labels, alpha, mask)
        target_t, rows_t = self._with_teacher(logits_t, p_t, labels, alpha, mask)
        loss = (soft_cross_entropy(logits_i, target_i) + soft_cross_entropy(logits_t, target_t)) / 2
        return {"contrastive_loss": loss, "alpha": torch.tensor(alpha), "rho": torch.tensor(rho),
                "distill_rows": ((rows_i.float().mean() + rows_t.float().mean()) / 2).detach()}

    def teacher_probs(self, teacher_logits):
        """softmax(teacher / T) per row; a row without any finite logit (no teacher for it) is all zeros."""
        t = teacher_logits.detach().float()
        finite = torch.isfinite(t).any(dim=-1, keepdim=True)
        return torch.where(finite, F.softmax(torch.where(finite, t, 0.0) / self.teacher_temperature, dim=-1), 0.0)

    @staticmethod
    def _with_teacher(logits, teacher, labels, alpha, mask):
        """(targets, rows given soft targets): (1 − α)·onehot + α·teacher on the chosen rows that have a teacher
        (a row of teacher that sums to 0 has none)."""
        onehot = F.one_hot(labels, logits.shape[1]).float()
        if alpha == 0.0:
            return onehot, torch.zeros_like(mask)
        rows = mask & ~(teacher.sum(dim=-1) < 0.5)  # (a NaN teacher is kept: the loss then says it is not finite)
        return torch.where(rows[:, None], (1.0 - alpha) * onehot + alpha * teacher, onehot), rows
