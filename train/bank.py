"""PSD's embedding-bank teacher (`--bank-teacher`): PS-KD's previous-epoch teacher at no added forward pass.

The bank holds, for every training sample, the image and text embedding the model produced for it the last time a
step saw it. A batch's teacher logits are its samples' bank rows, s·I_bank·T_bankᵀ at the model's current logit
scale: the model as it was one epoch ago (each sample's own moment), for the cost of a lookup and one B×B product.
A sample not seen yet has no row (NaN) and keeps its one-hot target; its column is left out of the other rows'
teachers.

On disk (RUN/bank/, local to each rank): rankR.f16, a memory-mapped fp16 array [ids, 2, dim] (image, text) indexed
by the stable sample id of train/data.py's sample_ids (shard and ordinal), 4·dim bytes a sample; bank.json says what
it was made for (dataset, ids, dim, world size), and a bank made for anything else is refused. Every rank writes
the rows of the whole global batch (the features are gathered as the loss gathers them), so each rank's bank is
complete whichever rank reads a sample next epoch. With each checkpoint the live array is copied to
rankR.step_NNNNNN.f16; a resumed run starts from the copy of its checkpoint's step, so it continues with the bank
the uninterrupted run had at that step.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import InputError
from ..core.io import atomic_path, made_from_differs, write_json
from ..pipeline.format import dataset_id, read_info
from .distributed import gather_rows
from .models import model_config, resolve_model_name
from .teacher import Teacher


class EmbeddingBank:
    def __init__(self, folder: str, rank: int, ids: int, dim: int, made_for: dict):
        self.folder, self.rank, self.ids, self.dim = folder, rank, int(ids), int(dim)
        os.makedirs(folder, exist_ok=True)
        meta = {"ids": self.ids, "dim": self.dim, "dtype": "float16", "layout": "[id, image|text, dim]", **made_for}
        meta_path = os.path.join(folder, "bank.json")
        changed = made_from_differs(meta_path, meta)
        if changed:
            raise InputError(f"{folder}: the embedding bank was made for another run ({', '.join(changed)} differ); "
                             f"delete the folder, or train into another --out")
        if not os.path.isfile(meta_path) and self.rank == 0:
            write_json(meta_path, meta, indent=1)
        self.path = os.path.join(folder, f"rank{rank}.f16")
        self.array = None

    @property
    def bytes_per_sample(self) -> int:
        return 2 * self.dim * 2

    def _open(self, fresh: bool):
        shape = (self.ids, 2, self.dim)
        if fresh or not os.path.isfile(self.path) or os.path.getsize(self.path) != int(np.prod(shape)) * 2:
            array = np.memmap(self.path, dtype=np.float16, mode="w+", shape=shape)
            array[:] = np.nan
            array.flush()
        self.array = np.memmap(self.path, dtype=np.float16, mode="r+", shape=shape)

    def start(self, step: int) -> None:
        """A new run starts with an empty bank; a run resumed at `step` with the bank saved with that step."""
        if step == 0:
            self._open(fresh=True)
            return
        saved = self.snapshot(step)
        if not os.path.isfile(saved):  # every rank's bank is the same: a rank added since takes rank 0's
            saved = os.path.join(self.folder, f"rank0.step_{step:06d}.f16")
        if not os.path.isfile(saved):
            raise InputError(f"{self.folder}: no embedding bank saved with the checkpoint of step {step} "
                             f"({os.path.basename(saved)}); the run cannot continue with the bank it had")
        shutil.copyfile(saved, self.path)
        self._open(fresh=False)

    def snapshot(self, step: int) -> str:
        return os.path.join(self.folder, f"rank{self.rank}.step_{step:06d}.f16")

    def save(self, step: int, keep_steps: set[int]) -> None:
        """Copy the live bank beside the checkpoint of `step` (tmp, then rename); drop copies of checkpoints that
        are gone."""
        self.array.flush()
        dest = self.snapshot(step)
        with atomic_path(dest) as tmp:
            shutil.copyfile(self.path, tmp)
        for old in glob.glob(os.path.join(self.folder, f"rank{self.rank}.step_*.f16")):
            m = re.search(r"step_(\d+)\.f16$", old)
            if m and int(m.group(1)) not in keep_steps | {step}:
                os.remove(old)

    def lookup(self, ids: torch.Tensor):
        """(image rows, text rows, seen) for sample ids, as fp32 tensors on the ids' device."""
        idx = ids.detach().cpu().numpy()
        rows = torch.from_numpy(np.asarray(self.array[idx], dtype=np.float32)).to(ids.device)
        seen = ~torch.isnan(rows[:, 0, 0]) & ~torch.isnan(rows[:, 1, 0])
        return torch.nan_to_num(rows[:, 0]), torch.nan_to_num(rows[:, 1]), seen

    def write(self, ids: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        idx = ids.detach().cpu().numpy()
        rows = torch.stack([image_features.detach().float(), text_features.detach().float()], dim=1)
        self.array[idx] = rows.cpu().numpy().astype(np.float16)

    def teacher_logits(self, ids_global: torch.Tensor, logit_scale: torch.Tensor, local: slice = slice(None)):
        """The teacher's (image→text, text→image) logits of a step, this rank's rows (`local`: their place in the
        global batch) × the global batch's columns, at the model's logit scale; −inf where the row's or the column's
        sample has no bank row yet. One read of the bank per step."""
        gi, gt, seen_g = self.lookup(ids_global)
        li, lt, seen_l = gi[local], gt[local], seen_g[local]
        scale = logit_scale.detach().float()
        valid = seen_l[:, None] & seen_g[None, :]
        minus = torch.tensor(float("-inf"), device=li.device)
        return (torch.where(valid, scale * li @ gt.T, minus), torch.where(valid, scale * lt @ gi.T, minus))


class BankTeacher(Teacher):
    """The bank as PSD's teacher: a step's teacher logits are its samples' bank rows; the step's features (every
    rank's, gathered) are written into it; it is copied beside each checkpoint."""

    def __init__(self, bank: EmbeddingBank, data: str):
        self.bank, self.data = bank, data

    def for_step(self, model, loss_fn, keys, ids, world, device):
        check_ids(ids, self.data)
        ids = ids.to(device)
        every = gather_rows(ids, world)
        start = (dist.get_rank() if world > 1 else 0) * len(ids)  # this rank's rows in the gathered batch
        local = slice(start, start + len(ids))

        def keep(image_features, text_features):
            self.bank.write(every.cpu(), gather_rows(image_features.detach().float(), world),
                            gather_rows(text_features.detach().float(), world))

        return (lambda mbs: {"teacher_logits": self.bank.teacher_logits(every, model.logit_scale.exp(), local)}), keep

    def save(self, step: int, keep_steps: set[int]) -> None:
        self.bank.save(step, keep_steps)


def bank_teacher(ctx) -> BankTeacher:
    """--bank-teacher: this rank's embedding bank, sized by the stream's stable sample ids, continued from the copy
    saved with the checkpoint the run resumes from."""
    cfg, stream = ctx.cfg, ctx.stream
    if stream.ids is None:
        raise InputError(f"--bank-teacher: --data {cfg.data} gives no stable sample ids (a psdclip dataset or subset "
                         f"does; shard URLs do not)")
    made_for = {"data": os.path.abspath(cfg.data), "dataset_id": dataset_id(read_info(stream.source.root)),
                "model": resolve_model_name(cfg.model)}
    bank = EmbeddingBank(os.path.join(cfg.out, "bank"), ctx.rank, stream.ids[""], model_config(cfg.model)["embed_dim"],
                         made_for)
    bank.start(ctx.start_step)
    return BankTeacher(bank, cfg.data)


def check_ids(ids: torch.Tensor, data: str) -> None:
    if bool((ids < 0).any()):
        raise InputError(f"--bank-teacher: --data {data} gives no stable sample ids (a psdclip dataset or subset "
                         f"does; shard URLs, mixtures and --follow do not)")
