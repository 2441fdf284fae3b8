"""Oracle soft targets (`--oracle-targets FILE`), a control of the PSD study, not a method.

Where the truth is known (the synthetic source's scene attributes, the emoji source's emoji codes), each sample has
an image group (what its picture shows) and a text group (what its caption means: for a mismatched caption, the
other scene's group; none for a caption that names nothing). The oracle's target for image i over the batch's texts
is uniform over the texts whose group is i's image group, and likewise for each text over the images; PSD mixes it
with one-hot by alpha on the rows it distils, as it mixes any teacher. A row with no matching item keeps one-hot.
It bounds what a self-distillation teacher could pass on in that regime.

FILE: Parquet or CSV with columns key, image_group, text_group (strings or numbers; empty: none), one row per
training sample (`psdclip data oracle` writes it); a sample missing from it is an error.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..core.errors import InputError

from .distributed import gather_rows
from .teacher import Teacher


class OracleTargets:
    def __init__(self, path: str):
        import pandas as pd

        try:
            frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype=str,
                                                                                        keep_default_na=False)
        except (OSError, ValueError) as err:
            raise InputError(f"--oracle-targets {path}: cannot read ({str(err).splitlines()[0][:160]})") from None
        missing = {"key", "image_group", "text_group"} - set(frame.columns)
        if missing:
            raise InputError(f"--oracle-targets {path}: no column(s) {', '.join(sorted(missing))} (expected key, "
                             f"image_group, text_group)")
        self.path = path
        groups = pd.concat([frame["image_group"], frame["text_group"]]).astype(str)
        names = sorted(set(groups) - {"", "nan", "None"})
        code = {g: i for i, g in enumerate(names)}
        image = [code.get(str(g), -1) for g in frame["image_group"]]
        text = [code.get(str(g), -1) for g in frame["text_group"]]
        self.codes_of = dict(zip(frame["key"].astype(str), zip(image, text)))
        self.groups = len(names)

    def codes(self, keys, device) -> torch.Tensor:
        """[n, 2] (image group, text group) codes of the samples named by `keys` (-1: none)."""
        try:
            rows = [self.codes_of[str(k)] for k in keys]
        except KeyError as err:
            raise InputError(f"--oracle-targets {os.path.basename(self.path)}: no row for sample {err.args[0]} (the "
                             f"file must cover every sample of --data)") from None
        return torch.tensor(np.asarray(rows, dtype=np.int64).reshape(-1, 2), device=device)


def oracle_targets(local: torch.Tensor, every: torch.Tensor):
    """(image→text, text→image) target distributions, local rows × global columns, from [n, 2] group codes of the
    local rows and of the global batch (rank order, as the loss gathers features); a row without a match is 0."""
    def spread(rows, cols):
        match = (rows[:, None] == cols[None, :]) & (rows[:, None] >= 0) & (cols[None, :] >= 0)
        match = match.float()
        return match / match.sum(dim=1, keepdim=True).clamp_min(1.0)

    return spread(local[:, 0], every[:, 1]), spread(local[:, 1], every[:, 0])


class OracleTeacher(Teacher):
    """The oracle as PSD's teacher: ready targets from the step's samples' groups (gathered across ranks)."""

    def __init__(self, targets: OracleTargets):
        self.targets = targets

    def for_step(self, model, loss_fn, keys, ids, world, device):
        local = self.targets.codes(keys, device)
        every = gather_rows(local, world)
        return (lambda mbs: {"teacher_targets": oracle_targets(local, every)}), None
