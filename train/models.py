"""Models come from open_clip, built from configs with no pretrained weights.

Presets: `tiny` (psdclip-tiny: 64 px ViT, 4 + 4 layers), `rn-small` (psdclip-rn-small: open_clip's
ModifiedResNet with one block per stage, width 16, at 48 px; a 2-layer, 64-wide text tower on 16 tokens: about
5x the samples/s of `tiny` on a 2-core CPU, and the model the CPU studies use), the paper's `RN50` and
`ViT-B-32`; also any open_clip model name or the path of a JSON model config. `encode_image` and
`encode_text(normalize=True)` are the one path that training, evaluation and the index share.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os

import open_clip
import torch

from ..core.errors import InputError

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
open_clip.add_model_config(_CONFIG_DIR)
PRESETS = {"tiny": "psdclip-tiny", "rn-small": "psdclip-rn-small", "rn50": "RN50", "vit-b-32": "ViT-B-32"}


def resolve_model_name(name: str) -> str:
    """A preset, an open_clip model name, or a JSON config path (registered under its file stem)."""
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise InputError(f"--model {name}: no such model config file")
        try:
            with open(name, encoding="utf-8") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as err:
            raise InputError(f"--model {name}: not valid JSON ({err.msg} at line {err.lineno})") from None
        cfg = cfg.get("model_cfg", cfg)
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise InputError(f"--model {name}: a model config needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(name)
        return os.path.splitext(os.path.basename(name))[0]
    if name not in open_clip.list_models():
        raise InputError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}), an open_clip model or a "
                         f"JSON config path")
    return name


def register_config(arch: str, cfg: dict) -> None:
    """Make a model config known to open_clip under `arch` (a run trained from a JSON config file stores the config
    in its checkpoints, so that eval, index and export build it without the file)."""
    import tempfile

    if open_clip.get_model_config(arch) is not None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, f"{arch}.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(tmp)


def model_config(name: str) -> dict:
    return open_clip.get_model_config(resolve_model_name(name))


def build_model(name: str, device: str | torch.device = "cpu", siglip: bool = False):
    """(model, train transform, eval transform, tokenizer) for a model name, randomly initialised. `siglip`: with
    the learnt logit bias of the sigmoid loss, logit scale and bias initialised as open_clip_train does for
    `--siglip` (log 10 and -10)."""
    arch = resolve_model_name(name)
    extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: that is the point
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            arch, pretrained=None, device=device, output_dict=True, **extra)
    finally:
        logging.disable(logging.NOTSET)
    return model, preprocess_train, preprocess_val, _tokenizer(arch, json.dumps(model_config(arch)["text_cfg"],
                                                                              sort_keys=True))


@functools.lru_cache(maxsize=8)
def _tokenizer(arch: str, text_cfg: str):  # pylint: disable=unused-argument  (text_cfg keys the cache)
    """open_clip's tokenizer for a model: building one reads the BPE vocabulary (~0.2 s), and it holds no state
    but a memo of words already split, so one per text configuration is shared (an eval or sweep in one process
    builds many models)."""
    return open_clip.get_tokenizer(arch)


def context_length(name: str) -> int:
    return int(model_config(name)["text_cfg"].get("context_length", 77))


def _trimmable(model) -> bool:
    """An open_clip CLIP text tower with a causal mask pooled at the end-of-text token: padding after that token
    cannot change anything before it, so the tokens may be cut after the longest text (or padded further)."""
    from open_clip.model import CLIP

    return type(model) is CLIP and getattr(model, "attn_mask", None) is not None and \
        getattr(model, "text_pool_type", None) in ("argmax", "eos")


def _used_length(tokens: torch.Tensor) -> int:
    used = (tokens != 0).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def _encode_first(model, text: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The text tower on tokens already cut to their first text.shape[1] positions (a trimmable model)."""
    from open_clip.transformer import text_global_pool

    n = text.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def encode_text(model, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """model.encode_text on tokens trimmed to the longest sequence in the batch, when that gives the same result
    (see _trimmable). Query captions are ~10-30 tokens of the 77, so this is several times less work.
    Any other model gets the plain call."""
    if not _trimmable(model):
        return model.encode_text(tokens, normalize=normalize)
    return _encode_first(model, tokens[:, :_used_length(tokens)], normalize)


class _FirstTokens(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return _encode_first(self.model, text, True)


class TracedText:
    """encode_text(model, tokens) for a query service: the text tower runs as TorchScript traces, one per
    token-length bucket (8, 16, 32, 48, 64 or the context length; a batch is cut to the smallest bucket that holds
    its longest text), traced when a bucket is first used. A trace runs without Python between its operators, so
    it releases the GIL for the whole forward pass (the service's event loop keeps answering meanwhile; eager
    mode takes the GIL back after every operator) and skips the per-module call overhead
    (benchmarks/text_tower.py measures both). Each trace is checked against eager mode on the batch it was traced with; a
    bucket whose trace differs, or a model that cannot be cut (see _trimmable), uses eager mode. The traces share
    the model's parameters (no copy). Not thread-safe: one caller at a time (the service's query thread)."""

    BUCKETS = (8, 16, 32, 48, 64)

    def __init__(self, model):
        self.model = model
        self.traces: dict[int, object] = {}
        self.usable = _trimmable(model)
        if self.usable:
            width = int(model.attn_mask.shape[0])
            self.buckets = sorted({b for b in self.BUCKETS if b < width} | {width})

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.usable:
            return encode_text(self.model, tokens)
        n = _used_length(tokens)
        width = next((b for b in self.buckets if b >= n), None)
        if width is None or width > tokens.shape[1]:
            return encode_text(self.model, tokens)
        text = tokens[:, :width]
        if width not in self.traces:
            self.traces[width] = self._trace(text)
        trace = self.traces[width]
        if trace is None:
            return _encode_first(self.model, text, True)
        # no graph optimisation: TorchScript's profiling executor specialises a graph on the shapes it sees and
        # optimises again as batch sizes change, which slowed the first workload after a service's start-up (the
        # 19:02 run of benchmarks/service.py in BENCHMARKS.md)
        with torch.jit.optimized_execution(False):
            return trace(text)

    def warm(self, tokenizer, device) -> None:
        """Traces every bucket now, so that no query pays for it: about 0.1 s per bucket for a small text tower."""
        if not self.usable:
            return
        with torch.no_grad():
            for width in self.buckets:
                self(tokenizer([" ".join(["a"] * (width - 2))] * 3).to(device))  # "a": one token each, + SOT/EOT

    def _trace(self, text: torch.Tensor):
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit is deprecated (torch 2.14) but kept; the trace's data-dependent branches are module
            # settings, fixed for a loaded model, which the check below confirms
            warnings.simplefilter("ignore")
            try:
                trace = torch.jit.trace(_FirstTokens(self.model).eval(), text, check_trace=False)
                with torch.jit.optimized_execution(False):
                    same = torch.allclose(trace(text), _encode_first(self.model, text, True), atol=1e-5)
            except Exception as err:  # pylint: disable=broad-except  (any failure: eager mode for this bucket)
                logging.getLogger(__name__).warning("text tower not traced at %d tokens: %s", text.shape[1], err)
                return None
        if not same:
            logging.getLogger(__name__).warning("text tower trace at %d tokens differs from eager mode: not used",
                                                text.shape[1])
        return trace if same else None
