"""psdclip eval: zero-shot, linear probe, retrieval and robustness on synthetic or real data.

Suites: synthetic:DIR (the synthetic source's held-out scenes and their shifted variants),
imagefolder:PATH, imagenet:PATH (ImageNet and its variants, as folders), retrieval:FILE. Image features are
computed once per (suite, checkpoint), cached under RUN/eval/cache/, and shared by every metric.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from psdclip.pipeline.dataset import write_json
from psdclip.pipeline.errors import InputError

from . import checkpoint as ckpt
from .config import EvalConfig, result_name
from .imagenet import collect_folders, group_scores, imagenet_layout as imagenet_variant
from .metrics import linear_probe, recall_at, retrieval_ranks, topk_correct
from .models import encode_text

SYNTH_TEMPLATES = ("a photo of a {}.", "a {} shape.", "a drawing of a {}.", "an image of a {}.", "{}")


# ---- model -------------------------------------------------------------------------------------------

def load_for_eval(target: str, device):
    from .export import checkpoint_path
    from .models import build_model, register_config

    path = checkpoint_path(target)
    state = ckpt.load(path)
    if "model_arch" not in state or "model" not in state:
        raise InputError(f"{path}: not a psdclip training checkpoint")
    if state.get("model_cfg"):  # a model from a JSON config file: known from the checkpoint itself
        register_config(state["model_arch"], json.loads(state["model_cfg"]))
    model, _, preprocess, tokenizer = build_model(state["model_arch"], device)
    model.load_state_dict(state["model"])
    model.eval()
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{os.path.getmtime(path)}:{state['step']}".encode()).hexdigest()[:16]
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if os.path.basename(
        os.path.dirname(path)) == "checkpoints" else os.path.dirname(os.path.abspath(path))
    return model, preprocess, tokenizer, {"checkpoint": path, "step": int(state["step"]), "digest": digest,
                                          "arch": state["model_arch"], "loss": state.get("loss"), "run": run_dir}


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform, border=0):
        self.paths, self.transform, self.border = list(paths), transform, border

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
                if self.border:  # ObjectNet's images carry a coloured frame
                    im = im.crop((self.border, self.border, im.width - self.border, im.height - self.border))
                return self.transform(im), True
        except Exception:  # pylint: disable=broad-except  (an image that does not decode is skipped, counted)
            return torch.zeros(3, *_size(self.transform)), False


def _size(transform):
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return (size, size) if isinstance(size, int) else tuple(size)
    return (224, 224)


@torch.no_grad()
def encode_images(model, preprocess, paths, cfg, device, border=0):
    loader = torch.utils.data.DataLoader(_Images(paths, preprocess, border), batch_size=cfg.batch_size, num_workers=cfg.workers)
    feats, ok = [], []
    for images, good in loader:
        feats.append(model.encode_image(images.to(device), normalize=True).float().cpu())
        ok.append(good)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    return torch.cat(feats).numpy(), torch.cat(ok).numpy().astype(bool)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch=256):
    out = [encode_text(model, tokenizer(list(texts[i:i + batch])).to(device)).float().cpu()
           for i in range(0, len(texts), batch)]
    return torch.cat(out).numpy()


def classifier(model, tokenizer, classnames, templates, device) -> np.ndarray:
    """open_clip's prompt-ensemble zero-shot classifier: (embed_dim, classes)."""
    from open_clip import build_zero_shot_classifier

    with torch.no_grad():
        return build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                          device=device).float().cpu().numpy()


class FeatureCache:
    """Image features per (suite, checkpoint), computed once and reused across metrics and runs of eval."""

    def __init__(self, run_dir, suite_slug, digest, dim: int):
        self.path = os.path.join(run_dir, "eval", "cache", f"{suite_slug}-{digest}.npz")
        self.data = dict(np.load(self.path)) if os.path.isfile(self.path) else {}
        self.dim = dim
        self.dirty = False

    def get(self, name, compute):
        cached = self.data.get(f"{name}.f")
        if cached is not None and cached.size and cached.shape[1] != self.dim:
            raise InputError(f"{self.path}: cached features have {cached.shape[1]} dimensions but the checkpoint "
                             f"embeds into {self.dim}; delete the cache file")
        if f"{name}.f" not in self.data:
            f, ok = compute()
            self.data[f"{name}.f"], self.data[f"{name}.ok"] = f, ok
            self.dirty = True
        return self.data[f"{name}.f"], self.data[f"{name}.ok"]

    def save(self):
        if self.dirty:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp.npz"
            np.savez(tmp, **self.data)
            os.replace(tmp, self.path)


# ---- splits --------------------------------------------------------------------------------------------

def split_of(keys) -> np.ndarray:
    """A stable 60/20/20 train/val/test split by a hash of each example's key."""
    h = np.array([int(hashlib.md5(str(k).encode()).hexdigest()[:8], 16) % 10 for k in keys])
    return np.where(h < 6, 0, np.where(h < 8, 1, 2))


def _zero_shot(logits, labels) -> dict:
    """top-1/top-5 from logits (examples x classes) and the true labels of those examples."""
    top1, top5 = topk_correct(logits, labels, 1), topk_correct(logits, labels, min(5, logits.shape[1]))
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "_top1": top1, "_n": len(labels)}


def _probe(feats, ok, labels, keys) -> dict | None:
    """None when the examples are too few to split into train/val/test with two classes to learn."""
    s = split_of(keys)
    parts = [(feats[ok & (s == k)], labels[ok & (s == k)]) for k in (0, 1, 2)]
    if any(len(y) == 0 for _, y in parts) or len(np.unique(parts[0][1])) < 2:
        return None
    res = linear_probe(*parts)
    return {"accuracy": res["accuracy"], "C": res["C"], "_correct": res["correct"]}


# ---- suites --------------------------------------------------------------------------------------------

def suite_synthetic(directory, model, preprocess, tokenizer, cfg, device, cache) -> dict:
    from psdclip.pipeline.synth import SHAPES, SHIFTS

    attrs_path = os.path.join(directory, "heldout", "attributes.parquet")
    if not os.path.isfile(attrs_path):
        raise InputError(f"synthetic:{directory}: no held-out scenes (heldout/attributes.parquet); make them with "
                         f"`psdclip data synth --heldout N`")
    held = pd.read_parquet(attrs_path)
    if cfg.split != "all":
        held = held[(held["id"] % 4 == 0) == (cfg.split == "val")].reset_index(drop=True)
    labels = held["shape"].map({s: i for i, s in enumerate(SHAPES)}).to_numpy()
    clf = classifier(model, tokenizer, list(SHAPES), SYNTH_TEMPLATES, device)
    out: dict = {}
    base = None
    for variant in SHIFTS:
        paths = [os.path.join(directory, "heldout", variant, f"{i:07d}.jpg") for i in held["id"]]
        name = variant if cfg.split == "all" else f"{variant}@{cfg.split}"
        feats, ok = cache.get(name, lambda p=paths: encode_images(model, preprocess, p, cfg, device))
        zs = _zero_shot(feats[ok] @ clf, labels[ok])
        out[f"zeroshot_shape_{variant}"] = zs
        if variant == "base":
            base = (feats, ok)
    feats, ok = base
    probe = _probe(feats, ok, labels, held["id"])
    if probe is not None:
        out["linear_probe_shape"] = probe
    colours = sorted(held["colour"].unique())
    clf_c = classifier(model, tokenizer, colours, ("a photo of a {} shape.", "something {}."), device)
    colour_labels = held["colour"].map({c: i for i, c in enumerate(colours)}).to_numpy()
    out["zeroshot_colour_base"] = _zero_shot(feats[ok] @ clf_c, colour_labels[ok])
    txt = encode_texts(model, tokenizer, held["true_caption"].tolist(), device)
    i2t, t2i = retrieval_ranks(feats[ok] @ txt[ok].T, np.arange(int(ok.sum())))
    out["retrieval"] = {**{f"i2t_{k}": v for k, v in recall_at(i2t).items()},
                        **{f"t2i_{k}": v for k, v in recall_at(t2i).items()},
                        "mean_R@1": float(((i2t < 1).mean() + (t2i < 1).mean()) / 2), "gallery": int(ok.sum()),
                        "_i2t_r1": (i2t < 1).astype(float), "_t2i_r1": (t2i < 1).astype(float)}
    out["robustness"] = {"base": out["zeroshot_shape_base"]["top1"],
                         **{v: out[f"zeroshot_shape_{v}"]["top1"] for v in SHIFTS if v != "base"}}
    return out


def _folder_classes(path):
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such folder")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise InputError(f"{path}: no class subfolders")
    files, labels = collect_folders(path, classes, {c: i for i, c in enumerate(classes)})
    return classes, files, labels


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def suite_folder(path, model, preprocess, tokenizer, cfg, device, cache) -> dict:
    classes, files, labels = _folder_classes(path)
    names_file = os.path.join(path, "classnames.txt")
    classnames, pairing = class_names(classes, _read_lines(names_file) if os.path.isfile(names_file) else None,
                                      names_file)
    tpl_file = os.path.join(path, "templates.txt")
    templates = _read_lines(tpl_file) if os.path.isfile(tpl_file) else ["a photo of a {}."]
    if any("{}" not in t for t in templates):
        raise InputError(f"{tpl_file}: every template needs a {{}} for the class name")
    feats, ok = cache.get("images", lambda: encode_images(model, preprocess, files, cfg, device))
    clf = classifier(model, tokenizer, classnames, templates, device)
    out = _classification(path, files, labels, feats, ok, feats[ok] @ clf)
    out["class_names"] = pairing
    return out


def class_names(folders: list[str], names: list[str] | None, names_file: str) -> tuple[list[str], str]:
    """The class name of each (sorted) class folder, and how they were paired, for the result. Without
    classnames.txt: the folder name, `_` read as a space. With it: by name when its lines are the folder names
    (in any order, `_` or space, any case); otherwise line i names the i-th folder in sorted order."""
    plain = [c.replace("_", " ") for c in folders]
    if names is None:
        return plain, "folder names"
    if len(names) != len(folders):
        raise InputError(f"{names_file}: {len(names)} class names for {len(folders)} class folders")
    norm = {n.replace("_", " ").strip().lower(): n for n in names}
    if len(norm) == len(names) and set(norm) == {p.lower() for p in plain}:
        return [norm[p.lower()] for p in plain], "classnames.txt paired with the folders by name"
    shown = ", ".join(f"{f} -> {n}" for f, n in zip(folders[:3], names[:3]))
    return list(names), f"classnames.txt line i names the i-th folder in sorted order ({shown}, ...)"


def suite_imagenet(path, model, preprocess, tokenizer, cfg, device, cache) -> dict:
    """ImageNet, -V2, -Sketch, -R, -A and ObjectNet folders (see psdclip.train.imagenet)."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    variant = imagenet_variant(path)
    columns = variant.classes
    feats, ok = cache.get("images", lambda: encode_images(model, preprocess, variant.files, cfg, device,
                                                          border=variant.border))
    clf = classifier(model, tokenizer, [IMAGENET_CLASSNAMES[c] for c in columns], OPENAI_IMAGENET_TEMPLATES, device)
    out = _classification(path, variant.files, variant.labels, feats, ok,
                          group_scores(feats[ok] @ clf, variant.groups, columns))
    out.update(variant=variant.name, classes=len(variant.groups))
    return out


def _classification(path, files, labels, feats, ok, logits) -> dict:
    """Zero-shot top-1/5 from logits over the good images, and the linear probe, for a folder suite."""
    out = {"zeroshot": _zero_shot(logits, labels[ok]), "skipped_images": int((~ok).sum())}
    probe = _probe(feats, ok, labels, [os.path.relpath(f, path) for f in files])
    if probe is not None:
        out["linear_probe"] = probe
    return out


def suite_retrieval(path, model, preprocess, tokenizer, cfg, device, cache) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"retrieval:{path}: no such file")
    try:
        df = pd.read_json(path, lines=True) if path.endswith((".jsonl", ".json")) else pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError and EmptyDataError are ValueErrors
        kind = "JSON lines" if path.endswith((".jsonl", ".json")) else "CSV"
        raise InputError(f"retrieval:{path}: not a readable {kind} file ({str(err).strip().splitlines()[-1][:120]})") \
            from None
    if "image" not in df or not ({"caption", "captions"} & set(df.columns)):
        raise InputError(f"{path}: needs an 'image' column and a 'caption' (or 'captions' list) column")
    if "captions" in df:
        df = df.explode("captions").rename(columns={"captions": "caption"})
    base = os.path.dirname(os.path.abspath(path))
    df["path"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in df["image"].astype(str)]
    missing = [p for p in df["path"].unique() if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{path}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    images = list(dict.fromkeys(df["path"]))
    index = {p: i for i, p in enumerate(images)}
    feats, ok = cache.get("images", lambda: encode_images(model, preprocess, images, cfg, device))
    txt = encode_texts(model, tokenizer, df["caption"].astype(str).tolist(), device)
    caption_image = df["path"].map(index).to_numpy()
    i2t, t2i = retrieval_ranks(feats @ txt.T, caption_image)
    return {"retrieval": {**{f"i2t_{k}": v for k, v in recall_at(i2t).items()},
                          **{f"t2i_{k}": v for k, v in recall_at(t2i).items()},
                          "_i2t_r1": (i2t < 1).astype(float), "_t2i_r1": (t2i < 1).astype(float),
                          "images": len(images), "captions": len(df)}, "skipped_images": int((~ok).sum())}


# ---- command -------------------------------------------------------------------------------------------

def evaluate(cfg: EvalConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    t0 = time.time()
    model, preprocess, tokenizer, info = load_for_eval(cfg.target, device)
    kind, arg = cfg.suite.split(":", 1)
    slug = f"{kind}-{hashlib.md5(os.path.abspath(arg).encode()).hexdigest()[:8]}"
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else \
        int(encode_texts(model, tokenizer, ["x"], device).shape[1])
    cache = FeatureCache(info["run"], slug, info["digest"], dim)
    runner = {"synthetic": suite_synthetic, "imagefolder": suite_folder, "retrieval": suite_retrieval,
              "imagenet": suite_imagenet}[kind]
    raw = runner(arg, model, preprocess, tokenizer, cfg, device, cache)
    cache.save()
    metrics, examples = {}, {}
    for group, values in raw.items():
        if not isinstance(values, dict):
            metrics[group] = values
            continue
        for k, v in values.items():
            if k.startswith("_"):
                if isinstance(v, np.ndarray):
                    examples[f"{group}.{k[1:]}"] = v.tolist()
            else:
                metrics[f"{group}.{k}"] = v
    result = {"suite": cfg.suite, "split": cfg.split, "kind": kind, **{k: info[k] for k in ("checkpoint", "step", "arch", "loss")},
              "metrics": metrics, "examples": examples, "time_s": round(time.time() - t0, 2)}
    out_dir = os.path.join(info["run"], "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{result_name(cfg.suite, cfg.split)}.json")
    write_json(path, result, indent=1)
    result["path"] = path
    return result


def format_result(result: dict) -> str:
    lines = [f"{result['suite']}  (checkpoint step {result['step']}, {result['arch']}, loss {result['loss']})", ""]
    width = max(len(k) for k in result["metrics"]) + 2
    for k, v in result["metrics"].items():
        lines.append(f"{k:<{width}}{v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}{v:>10}")
    lines.append(f"\nwritten to {result['path']} in {result['time_s']} s")
    return "\n".join(lines)


def cmd_eval(cfg: EvalConfig) -> int:
    result = evaluate(cfg)
    if cfg.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    else:
        print(format_result(result))
    sys.stdout.flush()
    return 0
