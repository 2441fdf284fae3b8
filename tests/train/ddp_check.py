"""Run under torchrun (or alone): loss and gradients of CLIP and PSD over a fixed global batch."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from psdclip.train.losses import CLIPLoss, PSDLoss, PSDSchedule


def main(out):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(12, 6), torch.nn.Linear(10, 6)
    x_all, y_all = torch.randn(16, 12), torch.randn(16, 10)
    n = 16 // world
    x, y = x_all[rank * n:(rank + 1) * n], y_all[rank * n:(rank + 1) * n]
    model = torch.nn.ModuleDict({"i": enc_i, "t": enc_t})
    results = {}
    for name, loss_fn in (("clip", CLIPLoss(rank, world)),
                          ("psd", PSDLoss(PSDSchedule(10, 0.6, 0.6, "constant", 0.5, 0.5, "constant"), 1.5, seed=1,
                                          rank=rank, world_size=world))):
        model.zero_grad()
        fi, ft = F.normalize(model["i"](x), dim=-1), F.normalize(model["t"](y), dim=-1)
        loss = loss_fn(fi, ft, torch.tensor(5.0), step=4)["contrastive_loss"]
        loss.backward()
        if world > 1:  # what DDP does: average the gradients over the ranks
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            total = loss.detach().clone()
            dist.all_reduce(total)
            loss = total / world
        results[name] = {"loss": loss.detach(), **{k: p.grad.clone() for k, p in model.named_parameters()}}
    if rank == 0:
        torch.save(results, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
