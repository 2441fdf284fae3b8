"""psdclip export: a run's (or checkpoint's) model as a plain open_clip checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import open_clip
import torch

from psdclip.pipeline.errors import InputError

from . import checkpoint as ckpt


@dataclass
class ExportConfig:
    """psdclip export: write an open_clip checkpoint (state_dict) and its model config beside it."""

    run: str = field(default="", metadata={"help": "run directory or checkpoint file", "positional": True})
    out: str = field(default="", metadata={"help": "output .pt file"})

    def __post_init__(self):
        if not self.run or not self.out:
            raise InputError("usage: psdclip export RUN_OR_CHECKPOINT --out FILE.pt")


def checkpoint_path(run_or_file: str) -> str:
    if os.path.isfile(run_or_file):
        return run_or_file
    ckpt_dir = os.path.join(run_or_file, "checkpoints")
    files = ckpt.list_checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not files:
        raise InputError(f"{run_or_file}: no checkpoint found (neither a file nor a run with checkpoints/)")
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    return files[-1]


def export(cfg: ExportConfig) -> int:
    path = checkpoint_path(cfg.run)
    state = ckpt.load(path)
    arch = state.get("model_arch")
    if not arch or "model" not in state:
        raise InputError(f"{path}: not a psdclip training checkpoint")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    torch.save({"state_dict": state["model"], "step": state["step"], "model_arch": arch}, cfg.out)
    config_path = os.path.splitext(cfg.out)[0] + ".json"
    with open(config_path, "w") as f:
        json.dump({"model_arch": arch, "model_cfg": open_clip.get_model_config(arch)}, f, indent=2)
    print(f"wrote {cfg.out} (open_clip checkpoint of {arch}, step {state['step']}) and {config_path}")
    print(f"load it with: open_clip.create_model_and_transforms({arch!r}, pretrained={cfg.out!r})"
          + ("  (after open_clip.add_model_config(" + repr(config_path) + "))" if arch.startswith("psdclip-") else ""))
    return 0
