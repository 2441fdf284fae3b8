"""psdclip export: a run's (or checkpoint's) model as a plain open_clip checkpoint."""
from __future__ import annotations

import os

import open_clip
import torch

from ..core.io import write_json
from ..core.errors import InputError

from .checkpoint import Checkpoint, checkpoint_path
from .config import ExportConfig


def export(cfg: ExportConfig) -> int:
    path = checkpoint_path(cfg.run)
    state = Checkpoint.read(path)
    arch = state.model_arch
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    torch.save({"state_dict": state.model, "step": state.step, "model_arch": arch}, cfg.out)
    # the plain open_clip model config (what add_model_config reads), registered under the file's stem
    config_path = os.path.splitext(cfg.out)[0] + ".json"
    from . import models  # noqa: F401  registers psdclip's own model configs with open_clip

    model_cfg = state.model_config() or open_clip.get_model_config(arch)
    if model_cfg is None:
        raise InputError(f"{path}: model {arch!r} is not registered with open_clip; cannot write its config")
    write_json(config_path, model_cfg)
    name = os.path.splitext(os.path.basename(config_path))[0]
    print(f"wrote {cfg.out} (open_clip checkpoint of {arch}, step {state.step}) and {config_path}")
    print(f"load it with: import open_clip; open_clip.add_model_config({config_path!r}); "
          f"model, _, preprocess = open_clip.create_model_and_transforms({name!r}, pretrained={cfg.out!r})")
    return 0
