"""Devices and models for inference and fine-tuning: which device a rank uses (`resolve_device`), a trained model
loaded from its checkpoint (`load_model` -> `LoadedModel`, used by eval, index build and the service), and starting
weights from a run, an open_clip checkpoint or an open_clip pretrained tag (`load_pretrained`)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import InputError
from .checkpoint import Checkpoint, checkpoint_path, load


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU; otherwise the device named."""
    if spec == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(spec)
        if device.type == "cuda" and device.index is None:  # `--device cuda`: this rank's GPU, as auto picks it
            # (torch.cuda.set_device refuses a device without an index; every rank would otherwise share GPU 0)
            device = torch.device("cuda", local_rank)
    if device.type == "cuda" and torch.cuda.is_available() and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: this rank wants {device} but {torch.cuda.device_count()} CUDA device(s) "
                         "are visible; to share one GPU between ranks, name it (--device cuda:0) and use "
                         "--dist-backend gloo")
    return device


def fast_cuda_math(device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA, as open_clip sets them (eval and the service ran full fp32)."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


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


def load_pretrained(model: torch.nn.Module, spec: str, arch: str, flag: str = "--pretrained") -> str:
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
            raise InputError(f"{flag} {spec!r}: neither a file nor a run, nor an open_clip pretrained tag of "
                             f"{arch} ({', '.join(tags) or 'it has none'})")
        try:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, spec))
        except Exception as err:  # pylint: disable=broad-except  (no network, hub down)
            raise InputError(f"{flag} {spec!r}: could not download it ({type(err).__name__}); give a local "
                             f"checkpoint instead") from None
        state = load(path)
        weights = state.get("state_dict", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InputError(f"{flag} {spec}: holds no model weights")
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    # the logit bias belongs to the loss (SigLIP), not to the towers: a CLIP model fine-tuned with SigLIP starts
    # from open_clip's init of it, and a SigLIP model fine-tuned with CLIP drops it
    has_bias = getattr(model, "logit_bias", None) is not None
    if has_bias and "logit_bias" not in weights:
        weights["logit_bias"] = model.logit_bias.detach().clone()
    elif not has_bias:
        weights.pop("logit_bias", None)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        model_flag = "--model" if flag == "--pretrained" else "--distill-model"
        raise InputError(f"{flag} {spec}: its weights do not fit {model_flag} {arch} ({detail})") from None
    return path


def load_model(target: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the checkpoint's open_clip model (from its registered or embedded config, no pretrained weights),
    load its weights and put it in eval mode on `device`. `target` is a checkpoint file or a run directory."""
    from .models import build_model, register_config  # lazy: open_clip, slow to import

    device = torch.device(device)
    fast_cuda_math(device)
    path = checkpoint_path(target)
    state = Checkpoint.read(path)
    if state.model_cfg:  # a model from a JSON config file: known from the checkpoint itself
        register_config(state.model_arch, state.model_config())
    # a SigLIP model has a learnt logit bias: known from its weights
    model, _, preprocess, tokenizer = build_model(state.model_arch, device, siglip="logit_bias" in state.model)
    model.load_state_dict(state.model)
    model.eval()
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{os.path.getmtime(path)}:{state.step}".encode()).hexdigest()[:16]
    parent = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, checkpoint=path,
                       run=run, step=state.step, arch=state.model_arch, loss=state.loss,
                       digest=digest)
