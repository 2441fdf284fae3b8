"""Checkpoints: model, optimizer, scaler, step, RNG states and data position, written to a temporary
name and renamed (a crash never leaves a half-written step_*.pt), the newest K kept, loaded with
torch.load(weights_only=True). `latest` names the newest complete checkpoint."""
from __future__ import annotations

import glob
import os
import random
import re
import sys
import uuid

import numpy as np
import torch

from psdclip.pipeline.errors import InputError

_STEP = re.compile(r"step_(\d+)\.pt$")


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
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    latest_tmp = os.path.join(ckpt_dir, f"latest.tmp-{uuid.uuid4().hex[:8]}")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))
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
            print(f"psdclip: warning: {err}; trying an older checkpoint", file=sys.stderr)
    return None
