"""Checkpoints: model, optimizer, scaler, step, RNG states and data position, written to a temporary
name and renamed (a crash never leaves a half-written step_*.pt), the newest K kept, loaded with
torch.load(weights_only=True). `latest` names the newest complete checkpoint.

Also the one home of checkpoint -> model loading (`load_model` -> `LoadedModel`, used by eval, index build and
the service) and of device resolution (`resolve_device`, used by training, eval and index build)."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psdclip.pipeline.dataset import atomic_path, write_text
from psdclip.pipeline.errors import InputError

_STEP = re.compile(r"step_(\d+)\.pt$")

log = logging.getLogger(__name__)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # a job may resume with fewer (or more) visible devices
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def save(ckpt_dir: str, step: int, payload: dict, keep: int) -> str:
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"step_{step:06d}.pt")
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        os.remove(old)
    return final


def list_checkpoints(ckpt_dir: str) -> list[str]:
    files = [p for p in glob.glob(os.path.join(ckpt_dir, "step_*.pt")) if _STEP.search(p)]
    return sorted(files, key=lambda p: int(_STEP.search(p).group(1)))


def clean_partial(ckpt_dir: str) -> None:
    for p in glob.glob(os.path.join(ckpt_dir, "*.tmp-*")):
        os.remove(p)


def load(path: str, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except Exception as err:  # pylint: disable=broad-except
        raise InputError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None


def find_latest(ckpt_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint that loads (a damaged one is reported and passed over)."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path)
        except InputError as err:
            log.warning(f"psdclip: warning: {err}; trying an older checkpoint")
    return None


# ---- devices and models ------------------------------------------------------------------------------

def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU; otherwise the device named."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def checkpoint_path(run_or_file: str) -> str:
    """A checkpoint file as given, or a run directory's newest complete checkpoint (checkpoints/latest)."""
    if os.path.isfile(run_or_file):
        return run_or_file
    ckpt_dir = os.path.join(run_or_file, "checkpoints")
    files = list_checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not files:
        raise InputError(f"{run_or_file}: no checkpoint found (neither a file nor a run with checkpoints/)")
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    return files[-1]


def image_size(transform) -> tuple[int, int]:
    """The (height, width) an open_clip preprocessing transform produces."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return (size, size) if isinstance(size, int) else tuple(size)
    return (224, 224)


@dataclass
class LoadedModel:
    """A trained model ready for inference, with what was loaded and from where."""
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device
    checkpoint: str  # the checkpoint file
    run: str         # its run directory (the file's directory for a loose checkpoint)
    step: int
    arch: str
    loss: str | None
    digest: str      # identifies (file, mtime, step): the key of the evaluation feature cache

    @property
    def image_size(self) -> tuple[int, int]:
        return image_size(self.preprocess)


def load_pretrained(model: torch.nn.Module, spec: str, arch: str) -> str:
    """Load weights into `model` from a psdclip run or checkpoint, a plain open_clip checkpoint (a `state_dict`, as
    `psdclip export` writes), or an open_clip pretrained tag for `arch`. Returns where they came from."""
    if os.path.exists(spec):
        path = checkpoint_path(spec)
        state = load(path)
        weights = state.get("model") or state.get("state_dict") or state
    else:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(arch)
        if spec not in tags:
            raise InputError(f"--pretrained {spec!r}: neither a file nor a run, nor an open_clip pretrained tag of "
                             f"{arch} ({', '.join(tags) or 'it has none'})")
        try:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, spec))
        except Exception as err:  # pylint: disable=broad-except  (no network, hub down)
            raise InputError(f"--pretrained {spec!r}: could not download it ({type(err).__name__}); give a local "
                             f"checkpoint instead") from None
        state = load(path)
        weights = state.get("state_dict", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InputError(f"--pretrained {spec}: holds no model weights")
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise InputError(f"--pretrained {spec}: its weights do not fit --model {arch} ({detail})") from None
    return path


def load_model(target: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the checkpoint's open_clip model (from its registered or embedded config, no pretrained weights),
    load its weights and put it in eval mode on `device`. `target` is a checkpoint file or a run directory."""
    from .models import build_model, register_config

    device = torch.device(device)
    path = checkpoint_path(target)
    state = load(path)
    if "model_arch" not in state or "model" not in state:
        raise InputError(f"{path}: not a psdclip training checkpoint")
    if state.get("model_cfg"):  # a model from a JSON config file: known from the checkpoint itself
        register_config(state["model_arch"], json.loads(state["model_cfg"]))
    model, _, preprocess, tokenizer = build_model(state["model_arch"], device)
    model.load_state_dict(state["model"])
    model.eval()
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{os.path.getmtime(path)}:{state['step']}".encode()).hexdigest()[:16]
    parent = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, checkpoint=path,
                       run=run, step=int(state["step"]), arch=state["model_arch"], loss=state.get("loss"),
                       digest=digest)
