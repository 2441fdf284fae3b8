"""CLIP: the symmetric InfoNCE loss over the global batch (open_clip's ClipLoss), one-hot targets (--loss clip)."""
from __future__ import annotations

from . import Objective


def make_loss(cfg, rank: int, world: int):
    from ..losses import CLIPLoss

    return CLIPLoss(rank=rank, world_size=world)


OBJECTIVE = Objective(name="clip", loss="clip", help="symmetric InfoNCE (CLIP)", options=(), make_loss=make_loss)
