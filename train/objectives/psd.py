"""PSD, progressive self-distillation (--loss psd): for a fraction rho of each batch's rows the target is
(1 - alpha) onehot + alpha softmax(teacher / T), alpha and rho following pure schedules of the step (train/losses.py).
The teacher is one of (train/teacher.py's protocol): the same pass's logits (the default, no added compute), an EMA
or a snapshot of the model (one more forward pass), the embedding bank of each sample's previous-epoch features
(train/bank.py) or a frozen model of another architecture (--distill-model)."""
from __future__ import annotations

from ...core.errors import InputError

from . import Objective

SCHEDULE = ("alpha_start", "alpha_max", "alpha_schedule", "rho_start", "rho_end", "rho_schedule")
TEACHERS = (("--ema-teacher", "ema_teacher"), ("--snapshot-every", "snapshot_every"),
            ("--distill-model", "distill_model"), ("--bank-teacher", "bank_teacher"),
            ("--oracle-targets", "oracle_targets"))


def make_loss(cfg, rank: int, world: int):
    from ..losses import PSDLoss, PSDSchedule

    schedule = PSDSchedule(total_steps=cfg.steps, **{f: getattr(cfg, f) for f in SCHEDULE})
    return PSDLoss(schedule, cfg.teacher_temperature, seed=cfg.seed, rank=rank, world_size=world)


def check(cfg) -> None:
    if cfg.snapshot_every < 0:
        raise InputError(f"--snapshot-every must be >= 0, got {cfg.snapshot_every}")
    if cfg.snapshot_every and cfg.ema_teacher:
        raise InputError("--ema-teacher and --snapshot-every are two different teachers: choose one")
    if bool(cfg.distill_model) != bool(cfg.distill_pretrained):
        raise InputError("--distill-model and --distill-pretrained go together: the teacher's architecture and its "
                         "weights")
    teachers = [flag for flag, name in TEACHERS if getattr(cfg, name)]
    if len(teachers) > 1:
        raise InputError(f"{' and '.join(teachers)} are different teachers of PSD: choose one")
    if cfg.bank_teacher and (cfg.follow or "::" in cfg.data):
        raise InputError("--bank-teacher indexes a fixed set of samples: not with --follow or a mixture of --data")
    if not cfg.teacher_temperature > 0:
        raise InputError(f"--teacher-temperature must be > 0, got {cfg.teacher_temperature}")


def make_teacher(ctx):
    """The run's PSD teacher (None: the same pass's own logits)."""
    cfg = ctx.cfg
    if cfg.ema_teacher or cfg.snapshot_every:
        from ..teacher import ModelTeacher

        return ModelTeacher.copy_of(ctx.model, ctx.saved, decay=cfg.ema_decay if cfg.ema_teacher else 0.0,
                                    every=1 if cfg.ema_teacher else cfg.snapshot_every)
    if cfg.distill_model:  # frozen, rebuilt from its file on a resume: not saved
        from ..teacher import ModelTeacher, external_teacher

        return ModelTeacher(external_teacher(cfg, ctx.model, ctx.device))
    if cfg.bank_teacher:
        from ..bank import bank_teacher

        return bank_teacher(ctx)
    return None


OBJECTIVE = Objective(
    name="psd", loss="psd", help="progressive self-distillation", make_loss=make_loss, check=check,
    teacher=make_teacher,
    options=(*SCHEDULE, "teacher_temperature", "ema_teacher", "ema_decay", "snapshot_every", "bank_teacher",
             "distill_model", "distill_pretrained"),
    exclusive=("distill_model", "bank_teacher"),
    misplaced="{option}: a teacher of PSD's soft targets; use --loss psd (got --loss {given})")
