"""Training objectives: one module each, in a registry. An objective binds its loss, the options it owns (its config
section), the checks those options need, what the model needs from it (SigLIP's logit bias) and, for PSD and its
control, the teacher that supplies the soft targets (train/teacher.py's protocol). The trainer asks the registry
for the run's objective and never branches on which one it runs.

    clip.py             symmetric InfoNCE (--loss clip)
    label_smoothing.py  a control: CLIP with targets (1 - eps) onehot + eps / B (--loss clip --label-smoothing EPS)
    siglip.py           the sigmoid loss with a learnt logit bias (--loss siglip)
    psd.py              progressive self-distillation and its teachers (--loss psd: same pass, EMA, snapshot, bank,
                        another model)
    oracle.py           a control: PSD with ground-truth soft targets (--loss psd --oracle-targets FILE)

A new objective is one module defining `OBJECTIVE = Objective(...)` plus its name in MODULES below (and its
options as fields of TrainConfig). This package is light (no torch at import): TrainConfig's checks run here when the
CLI parses its options; losses and teachers are imported when a run builds them.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable

from ...core.errors import InputError

MODULES = ("clip", "label_smoothing", "siglip", "psd", "oracle")


@dataclass(frozen=True)
class Objective:
    name: str
    loss: str  # the --loss value it runs under
    help: str
    options: tuple[str, ...]  # its config section: the TrainConfig fields that belong to it
    make_loss: Callable  # (cfg, rank, world) -> nn.Module whose forward returns {"contrastive_loss", ...}
    selected_by: str = ""  # a control: the option that selects it within its --loss (a non-default value)
    check: Callable | None = None  # (cfg) -> None: its options' checks across fields (InputError)
    model: dict = field(default_factory=dict)  # what the model needs: train.models.build_model's options
    teacher: Callable | None = None  # (TeacherContext) -> train.teacher.Teacher or None (the loss's own logits)
    exclusive: tuple[str, ...] = ()  # options of its section refused under another --loss (the rest: ignored there)
    misplaced: str = "{option}: an option of --loss {loss}; use --loss {loss} (got --loss {given})"


def registry() -> dict[str, Objective]:
    """{name: Objective} of every module in MODULES, in that order."""
    out = {}
    for name in MODULES:
        obj = importlib.import_module(f"{__name__}.{name}").OBJECTIVE
        out[obj.name] = obj
    return out


def _is_set(cfg, option: str) -> bool:
    default = next(f for f in dataclasses.fields(cfg) if f.name == option)
    value = getattr(cfg, option)
    if default.default is not dataclasses.MISSING:
        return value != default.default
    return bool(value)


def objective_of(cfg) -> Objective:
    """The objective a TrainConfig runs: a control whose option is set, else the objective of its --loss."""
    objectives = registry()
    for obj in objectives.values():
        if obj.selected_by and _is_set(cfg, obj.selected_by) and obj.loss == cfg.loss:
            return obj
    return next(o for o in objectives.values() if o.loss == cfg.loss and not o.selected_by)


def check(cfg) -> Objective:
    """Every objective's checks of its options (an option that does not apply to the run's --loss is ignored, but
    must still be valid), then an option that only an objective of another --loss takes is one line naming the
    --loss it needs. Returns the run's objective."""
    objectives = registry()
    for obj in objectives.values():
        if obj.check is not None:
            obj.check(cfg)
    for obj in objectives.values():
        for option in obj.exclusive:
            if obj.loss != cfg.loss and _is_set(cfg, option):
                raise InputError(obj.misplaced.format(option="--" + option.replace("_", "-"), loss=obj.loss,
                                                      given=cfg.loss))
    return objective_of(cfg)


def make_loss(cfg, rank: int = 0, world: int = 1):
    """The run's loss module (rank and world size: the loss gathers features across ranks)."""
    return objective_of(cfg).make_loss(cfg, rank, world)
