"""psdclip export: a run's (or checkpoint's) model as a plain open_clip checkpoint."""
from __future__ import annotations

import os

import open_clip
import torch

from ..core.errors import InputError
from ..core.locks import writer_lock
from ..core.io import atomic_path, write_json
from . import models  # noqa: F401  (registers psdclip's own model configs with open_clip)
from .checkpoint import Checkpoint, checkpoint_path
from .config import ExportConfig


def export(cfg: ExportConfig) -> dict:
    """Write the open_clip checkpoint and its model config; returns their paths, the architecture and the step. One
    export writes a --out at a time (FILE.pt and FILE.json come from one run)."""
    folder = _check_folder(cfg.out)
    with writer_lock(folder, f".{os.path.basename(cfg.out)}.lock", "export", "export"):
        return _export(cfg)


def _export(cfg: ExportConfig) -> dict:
    path = checkpoint_path(cfg.run)
    state = Checkpoint.read(path)
    arch = state.model_arch
    config_path = os.path.splitext(cfg.out)[0] + ".json"  # the plain open_clip model config, under the file's stem
    _check_out(cfg.out, config_path, cfg.force)

    model_cfg = state.model_config() or open_clip.get_model_config(arch)
    if model_cfg is None:
        raise InputError(f"{path}: model {arch!r} is not registered with open_clip; cannot write its config")
    if "logit_bias" in state.model:  # SigLIP: open_clip builds the bias parameter from its config (as its siglip configs)
        model_cfg = {**model_cfg, "init_logit_bias": float(state.model["logit_bias"].reshape(-1)[0])}
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with atomic_path(cfg.out) as tmp:  # replaced whole: an existing export is never left half-written
        torch.save({"state_dict": state.model, "step": state.step, "model_arch": arch}, tmp)
    write_json(config_path, model_cfg)
    return {"out": cfg.out, "config": config_path, "arch": arch, "step": state.step}


def _check_folder(out: str) -> str:
    """--out must name a file whose folder can be made: returns the folder."""
    if os.path.isdir(out):
        raise InputError(f"--out {out}: is a directory; name the .pt file to write (e.g. {os.path.join(out, 'model.pt')})")
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise InputError(f"--out {out}: {parent} is a file, not a folder")
    return os.path.dirname(os.path.abspath(out))


def _check_out(out: str, config_path: str, force: bool) -> None:
    """An existing export is replaced only with --force."""
    existing = [p for p in (out, config_path) if os.path.exists(p)]
    if existing and not force:
        raise InputError(f"--out {out}: {' and '.join(existing)} already exist(s); pass --force to replace the export")

