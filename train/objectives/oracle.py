"""Oracle targets, a control of the PSD study (not a method): PSD whose teacher is the ground truth, the target mass
spread over the in-batch items whose group matches (--loss psd --oracle-targets FILE; train/oracle.py). It bounds
what a self-distillation teacher could pass on where the truth is known."""
from __future__ import annotations

from . import Objective
from .psd import make_loss


def make_teacher(ctx):
    from ..oracle import OracleTeacher, OracleTargets

    return OracleTeacher(OracleTargets(ctx.cfg.oracle_targets))


OBJECTIVE = Objective(
    name="psd-oracle", loss="psd", help="PSD with ground-truth soft targets (a control)", make_loss=make_loss,
    teacher=make_teacher, options=("oracle_targets",), exclusive=("oracle_targets",), selected_by="oracle_targets",
    misplaced="{option}: a teacher of PSD's soft targets; use --loss psd (got --loss {given})")
