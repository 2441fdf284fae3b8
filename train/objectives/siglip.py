"""SigLIP: open_clip's sigmoid loss with a learnt logit bias (--loss siglip); the model is built with the bias, logit
scale and bias initialised as open_clip_train does for --siglip."""
from __future__ import annotations

from . import Objective


def make_loss(cfg, rank: int, world: int):
    from ..losses import SigLIPLoss

    return SigLIPLoss(rank=rank, world_size=world)


OBJECTIVE = Objective(name="siglip", loss="siglip", help="the sigmoid loss with a learnt logit bias", options=(),
                      make_loss=make_loss, model={"siglip": True})
