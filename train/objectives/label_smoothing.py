"""Label smoothing, a control of the PSD study (not a method): CLIP whose targets are (1 - eps) onehot + eps / B over
the batch, the standard soft-target baseline (--loss clip --label-smoothing EPS)."""
from __future__ import annotations

from ...core.errors import InputError

from . import Objective


def make_loss(cfg, rank: int, world: int):
    from ..losses import CLIPLoss

    return CLIPLoss(rank=rank, world_size=world, label_smoothing=cfg.label_smoothing)


def check(cfg) -> None:
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise InputError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")


OBJECTIVE = Objective(name="clip-label-smoothing", loss="clip", help="CLIP with label smoothing (a control)",
                      options=("label_smoothing",), exclusive=("label_smoothing",), selected_by="label_smoothing",
                       make_loss=make_loss, check=check,
                      misplaced="{option} is the CLIP control; use --loss clip (got --loss {given})")
