"""Run under torchrun (or alone): loss and gradients of CLIP, PSD and SigLIP over a fixed global batch."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from psdclip.train.losses import CLIPLoss, PSDLoss, SigLIPLoss, constant_schedule


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
    bias = torch.nn.Parameter(torch.tensor([-2.0]))  # SigLIP's learnt logit bias
    for name, loss_fn in (("clip", CLIPLoss(rank, world)),
                          ("psd", PSDLoss(constant_schedule(0.6, 0.5), 1.5, seed=1,
                                          rank=rank, world_size=world)),
                          ("siglip", SigLIPLoss(rank, world))):
        model.zero_grad()
        bias.grad = None
        fi, ft = F.normalize(model["i"](x), dim=-1), F.normalize(model["t"](y), dim=-1)
        loss = loss_fn(fi, ft, torch.tensor(5.0), step=4, logit_bias=bias)["contrastive_loss"]
        loss.backward()
        if world > 1:  # what DDP does: average the gradients over the ranks
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            total = loss.detach().clone()
            dist.all_reduce(total)
            loss = total / world
        if name == "siglip":
            if world > 1:
                dist.all_reduce(bias.grad)
                bias.grad /= world
        results[name] = {"loss": loss.detach(), **{k: p.grad.clone() for k, p in model.named_parameters()},
                         **({"bias": bias.grad.clone()} if name == "siglip" else {})}
    # the trainer's step (train.loop.forward_backward) on a model with a learnt logit scale: the whole local batch
    # in one pass, and as 2 micro-batches with feature-cache accumulation
    from psdclip.train.loop import forward_backward

    class Pair(torch.nn.Module):
        def __init__(self, bias: bool):
            super().__init__()
            torch.manual_seed(1)
            self.i, self.t = torch.nn.Linear(12, 6), torch.nn.Linear(10, 6)
            self.logit_scale = torch.nn.Parameter(torch.tensor(1.5))
            # SigLIP's learnt bias only where the loss uses it (DDP does not average the gradients of a step in
            # which a parameter took none)
            self.logit_bias = torch.nn.Parameter(torch.tensor([-3.0])) if bias else None

        def forward(self, a, b):
            return {"image_features": F.normalize(self.i(a), dim=-1), "text_features": F.normalize(self.t(b), dim=-1),
                    "logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}

    # PSD's embedding bank (the same rows in every process: 12 of the 16 samples seen) and the oracle's groups
    import pandas as pd

    from psdclip.train.bank import EmbeddingBank
    from psdclip.train.bank import BankTeacher
    from psdclip.train.oracle import OracleTargets, OracleTeacher

    folder = os.path.dirname(out)
    ids_all = torch.arange(16) * 3 + 1
    keys_all = [f"k{j}" for j in range(16)]
    oracle_file = os.path.join(folder, f"oracle{rank}.csv")
    pd.DataFrame({"key": keys_all, "image_group": [j % 5 for j in range(16)],
                  "text_group": [(j % 5 if j % 4 else (j + 1) % 5) for j in range(16)]}).to_csv(oracle_file, index=False)
    oracle = OracleTargets(oracle_file)
    g = torch.Generator().manual_seed(7)
    seen_rows = [F.normalize(torch.randn(12, 6, generator=g), dim=-1) for _ in range(2)]
    for name, parts in (("psd-one", 1), ("psd-accum", 2), ("siglip-one", 1), ("siglip-accum", 2), ("bank-one", 1),
                        ("bank-accum", 2), ("oracle-one", 1), ("oracle-accum", 2)):
        pair = Pair(bias=name.startswith("siglip"))
        net = torch.nn.parallel.DistributedDataParallel(pair) if world > 1 else pair
        loss_fn = SigLIPLoss(rank, world) if name.startswith("siglip") else \
            PSDLoss(constant_schedule(0.6, 0.5), 1.5, seed=1, rank=rank, world_size=world)
        m = n // parts
        teacher = keep = bank = None
        local_ids, local_keys = ids_all[rank * n:(rank + 1) * n], keys_all[rank * n:(rank + 1) * n]
        if name.startswith("bank"):
            bank = EmbeddingBank(os.path.join(folder, f"bank-{name}-{rank}"), rank, ids=60, dim=6, made_for={})
            bank.start(0)
            bank.write(ids_all[:12], *seen_rows)
        if name.startswith(("bank", "oracle")):
            chosen = OracleTeacher(oracle) if name.startswith("oracle") else BankTeacher(bank, "x")
            teacher, keep = chosen.for_step(pair, loss_fn, local_keys, local_ids, world, torch.device("cpu"))
        losses = forward_backward(net, pair, loss_fn, [(x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]) for k in range(parts)],
                                  step=4, world=world, teacher=teacher, on_features=keep)
        loss = losses["contrastive_loss"]
        if world > 1:  # DDP averaged the gradients; the loss is averaged here
            total = loss.clone()
            dist.all_reduce(total)
            loss = total / world
        results[name] = {"loss": loss, **{k: p.grad.clone() for k, p in pair.named_parameters()
                                          if p.grad is not None}}
        if bank is not None:  # every process's bank holds the whole global batch's new rows
            rows = bank.lookup(ids_all)
            results[name].update({"bank_image": rows[0], "bank_text": rows[1]})
    # a non-finite loss on rank 0 only: every rank decides to skip (or stop) the step
    from psdclip.train.distributed import all_finite

    mine = torch.tensor(float("nan") if rank == 0 else 1.0)
    results["finite"] = {"nan on rank 0": torch.tensor(all_finite(mine, world)),
                         "finite everywhere": torch.tensor(all_finite(torch.tensor(2.0), world))}
    # a stop signal on rank 1 only and a finite loss: one all-reduce tells every rank both
    from psdclip.train.distributed import step_flags

    results["flags"] = {"stop on rank 1": torch.tensor(step_flags(torch.tensor(1.0), rank == 1, world)),
                        "nan on rank 0": torch.tensor(step_flags(mine, False, world))}
    # the checkpoint a run resumes from: chosen on rank 0, broadcast; a node-local --out some rank lacks: one line
    from psdclip.core.errors import InputError
    from psdclip.train.checkpoint import choose_latest, save

    shared = os.path.join(os.path.dirname(out), "shared", "checkpoints")
    if rank == 0:
        for step in (1, 2):
            save(shared, step, {"model": {}, "step": step, "model_arch": "x"}, keep=5)
        open(os.path.join(shared, "step_000003.pt.tmp-deadbeef"), "w").close()  # a partial write, rank 0 removes
    if world > 1:
        dist.barrier()
    results["chosen"] = choose_latest(shared, rank, world)[0]
    # a node-local --out: each rank in its own folder (as on its own node), the same relative --out; only rank 0's
    # node has a checkpoint
    home = os.getcwd()
    os.makedirs(os.path.join(os.path.dirname(out), f"node{rank}"), exist_ok=True)
    os.chdir(os.path.join(os.path.dirname(out), f"node{rank}"))
    if rank == 0:
        save(os.path.join("run", "checkpoints"), 5, {"model": {}, "step": 5, "model_arch": "x"}, keep=5)
    if world > 1:
        dist.barrier()
    try:
        results["node_local"] = choose_latest(os.path.join("run", "checkpoints"), rank, world)[0]
    except InputError as err:
        results["node_local"] = f"error: {err}"
    os.chdir(home)
    torch.save(results, out if rank == 0 else f"{out}.rank{rank}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
