"""psdclip eval: zero-shot, linear probe, retrieval and robustness on synthetic or real data.

Suites: synthetic:DIR (the synthetic source's held-out scenes and their shifted variants),
imagefolder:PATH, imagenet:PATH (ImageNet and its variants, as folders), retrieval:FILE. Image features are
computed once per (suite, checkpoint), cached under RUN/eval/cache/, and shared by every metric.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..core.errors import InputError
from ..core.io import atomic_path, write_json
from ..pipeline.format import image_of
from ..pipeline.reader import tar_samples, wds_layout_shards
from ..pipeline.synth import SHAPES, SHIFTS
from ..train.loading import LoadedModel, image_size, load_model, resolve_device
from ..train.models import encode_text
from .config import EvalConfig, result_name
from .imagenet import collect_folders, group_scores
from .imagenet import imagenet_layout as imagenet_variant
from .metrics import linear_probe, recall_at, retrieval_ranks, topk_correct

SYNTH_TEMPLATES = ("a photo of a {}.", "a {} shape.", "a drawing of a {}.", "an image of a {}.", "{}")


# ---- images, texts and the feature cache ----------------------------------------------------------------

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
            return torch.zeros(3, *image_size(self.transform)), False


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
        """run_dir None: kept in memory only (evaluation during training: the weights change every step)."""
        self.path = os.path.join(run_dir, "eval", "cache", f"{suite_slug}-{digest}.npz") if run_dir else None
        self.data = dict(np.load(self.path)) if self.path and os.path.isfile(self.path) else {}
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
        if self.dirty and self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **self.data)


@dataclass
class SuiteContext:
    """What a suite evaluates with: the loaded model, the eval options and the image-feature cache."""
    loaded: LoadedModel
    cfg: EvalConfig
    cache: FeatureCache

    def images(self, name: str, paths, border: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(features, decoded-ok mask) of the images, from the cache or computed once under `name`."""
        m = self.loaded
        return self.cache.get(name, lambda: encode_images(m.model, m.preprocess, paths, self.cfg, m.device, border))

    def texts(self, texts) -> np.ndarray:
        return encode_texts(self.loaded.model, self.loaded.tokenizer, texts, self.loaded.device)

    def classifier(self, classnames, templates) -> np.ndarray:
        return classifier(self.loaded.model, self.loaded.tokenizer, classnames, templates, self.loaded.device)


@dataclass
class SuiteResult:
    """A suite's metrics (`group.name` -> value, in the order they are reported) and, for the metrics that are
    means over examples, the per-example values under the same name (what `psdclip compare` bootstraps)."""
    metrics: dict = field(default_factory=dict)
    per_example: dict = field(default_factory=dict)

    def add(self, group: str, values: dict, per_example: dict | None = None) -> None:
        self.metrics.update({f"{group}.{k}": v for k, v in values.items()})
        self.per_example.update({f"{group}.{k}": np.asarray(v) for k, v in (per_example or {}).items()})


# ---- splits --------------------------------------------------------------------------------------------

def split_of(keys) -> np.ndarray:
    """A stable 60/20/20 train/val/test split by a hash of each example's key."""
    h = np.array([int(hashlib.md5(str(k).encode()).hexdigest()[:8], 16) % 10 for k in keys])
    return np.where(h < 6, 0, np.where(h < 8, 1, 2))


def _zero_shot(logits, labels) -> tuple[dict, dict]:
    """(top-1, top-5 and mean per-class recall, per-example top-1) from logits (examples x classes) and the true
    labels of those examples. Mean per-class recall (CLIP_benchmark's): the top-1 recall of each class that has
    examples, averaged over those classes (equal to top-1 on a balanced set)."""
    top1, top5 = topk_correct(logits, labels, 1), topk_correct(logits, labels, min(5, logits.shape[1]))
    labels = np.asarray(labels)
    present = np.unique(labels)
    recall = float(np.mean([top1[labels == c].mean() for c in present])) if len(present) else 0.0
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "mean_per_class_recall": recall}, {"top1": top1}


def _probe(feats, ok, labels, keys) -> tuple[dict, dict] | None:
    """None when the examples are too few to split into train/val/test with two classes to learn."""
    s = split_of(keys)
    parts = [(feats[ok & (s == k)], labels[ok & (s == k)]) for k in (0, 1, 2)]
    if any(len(y) == 0 for _, y in parts) or len(np.unique(parts[0][1])) < 2:
        return None
    res = linear_probe(*parts)
    return {"accuracy": res["accuracy"], "C": res["C"]}, {"accuracy": res["correct"]}


def _retrieval(i2t: np.ndarray, t2i: np.ndarray) -> tuple[dict, dict]:
    """Recall@1/5/10 both ways from the ranks, and the per-example R@1 hits."""
    values = {**{f"i2t_{k}": v for k, v in recall_at(i2t).items()}, **{f"t2i_{k}": v for k, v in recall_at(t2i).items()}}
    return values, {"i2t_R@1": (i2t < 1).astype(float), "t2i_R@1": (t2i < 1).astype(float)}


# ---- suites --------------------------------------------------------------------------------------------

def suite_synthetic(directory: str, ctx: SuiteContext) -> SuiteResult:
    attrs_path = os.path.join(directory, "heldout", "attributes.parquet")
    if not os.path.isfile(attrs_path):
        raise InputError(f"synthetic:{directory}: no held-out scenes (heldout/attributes.parquet); make them with "
                         f"`psdclip data synth --heldout N`")
    split = ctx.cfg.split
    held = pd.read_parquet(attrs_path)
    if split != "all":
        held = held[(held["id"] % 4 == 0) == (split == "val")].reset_index(drop=True)
    labels = held["shape"].map({s: i for i, s in enumerate(SHAPES)}).to_numpy()
    clf = ctx.classifier(list(SHAPES), SYNTH_TEMPLATES)
    out = SuiteResult()
    top1 = {}
    for variant in SHIFTS:
        paths = [os.path.join(directory, "heldout", variant, f"{i:07d}.jpg") for i in held["id"]]
        feats, ok = ctx.images(variant if split == "all" else f"{variant}@{split}", paths)
        values, per_example = _zero_shot(feats[ok] @ clf, labels[ok])
        out.add(f"zeroshot_shape_{variant}", values, per_example)
        top1[variant] = values["top1"]
        if variant == "base":
            base = (feats, ok)
    feats, ok = base
    probe = _probe(feats, ok, labels, held["id"])
    if probe is not None:
        out.add("linear_probe_shape", *probe)
    colours = sorted(held["colour"].unique())
    clf_c = ctx.classifier(colours, ("a photo of a {} shape.", "something {}."))
    colour_labels = held["colour"].map({c: i for i, c in enumerate(colours)}).to_numpy()
    out.add("zeroshot_colour_base", *_zero_shot(feats[ok] @ clf_c, colour_labels[ok]))
    txt = ctx.texts(held["true_caption"].tolist())
    i2t, t2i = retrieval_ranks(feats[ok] @ txt[ok].T, np.arange(int(ok.sum())))
    values, per_example = _retrieval(i2t, t2i)
    out.add("retrieval", {**values, "mean_R@1": float(((i2t < 1).mean() + (t2i < 1).mean()) / 2),
                          "gallery": int(ok.sum())}, per_example)
    out.add("robustness", top1)
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


def suite_folder(path: str, ctx: SuiteContext) -> SuiteResult:
    classes, files, labels = _folder_classes(path)
    names_file = os.path.join(path, "classnames.txt")
    classnames, pairing = class_names(classes, _read_lines(names_file) if os.path.isfile(names_file) else None,
                                      names_file)
    tpl_file = os.path.join(path, "templates.txt")
    templates = _read_lines(tpl_file) if os.path.isfile(tpl_file) else ["a photo of a {}."]
    if any("{}" not in t for t in templates):
        raise InputError(f"{tpl_file}: every template needs a {{}} for the class name")
    feats, ok = ctx.images("images", files)
    clf = ctx.classifier(classnames, templates)
    out = _classification(path, files, labels, feats, ok, feats[ok] @ clf)
    out.metrics["class_names"] = pairing
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


def suite_imagenet(path: str, ctx: SuiteContext) -> SuiteResult:
    """ImageNet, -V2, -Sketch, -R, -A and ObjectNet folders (see psdclip.eval.imagenet)."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    variant = imagenet_variant(path)
    columns = variant.classes
    feats, ok = ctx.images("images", variant.files, border=variant.border)
    clf = ctx.classifier([IMAGENET_CLASSNAMES[c] for c in columns], OPENAI_IMAGENET_TEMPLATES)
    out = _classification(path, variant.files, variant.labels, feats, ok,
                          group_scores(feats[ok] @ clf, variant.groups, columns))
    out.metrics.update(variant=variant.name, classes=len(variant.groups))
    return out


def _classification(path, files, labels, feats, ok, logits) -> SuiteResult:
    """Zero-shot top-1/5 from logits over the good images, and the linear probe, for a folder suite."""
    if not np.asarray(ok).any():
        raise InputError(f"{path}: none of its {len(files):,} image files could be decoded as an image")
    out = SuiteResult()
    out.add("zeroshot", *_zero_shot(logits, labels[ok]))
    out.metrics["skipped_images"] = int((~ok).sum())
    probe = _probe(feats, ok, labels, [os.path.relpath(f, path) for f in files])
    if probe is not None:
        out.add("linear_probe", *probe)
    return out


def suite_retrieval(path: str, ctx: SuiteContext) -> SuiteResult:
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
    feats, ok = ctx.images("images", images)
    txt = ctx.texts(df["caption"].astype(str).tolist())
    caption_image = df["path"].map(index).to_numpy()
    values, per_example = _retrieval(*retrieval_ranks(feats @ txt.T, caption_image))
    out = SuiteResult()
    out.add("retrieval", {**values, "images": len(images), "captions": len(df)}, per_example)
    out.metrics["skipped_images"] = int((~ok).sum())
    return out


def suite_wds(path: str, ctx: SuiteContext) -> SuiteResult:
    """CLIP_benchmark's local webdataset layout (its `wds_*` datasets, read from disk, never downloaded): PATH/test/
    *.tar (or PATH/*.tar) with each sample's image (webp, jpg or png) and its class index (`cls`) and/or captions
    (`txt`, one per line), PATH/classnames.txt and PATH/zeroshot_classification_templates.txt (`{c}` for the class
    name). Zero-shot classification when samples carry `cls` (top-1, top-5, mean per-class recall), retrieval when
    they carry captions."""
    tars = wds_layout_shards(path)
    if not tars:
        folder = os.path.join(path, "test") if os.path.isdir(os.path.join(path, "test")) else path
        raise InputError(f"wds:{path}: no .tar shards in {folder} (CLIP_benchmark's layout: test/*.tar)")
    skipped = []
    images, labels, captions = [], [], []
    for s in tar_samples(tars, skipped.append):
        raw = image_of(s)
        if raw is None:
            continue
        images.append(io.BytesIO(raw))
        labels.append(int(s["cls"].decode().strip()) if s.get("cls") else -1)
        text = s.get("txt")
        captions.append([ln for ln in text.decode("utf-8", "replace").splitlines() if ln.strip()] if text else [])
    if not images:
        raise InputError(f"wds:{path}: no images in its shards")
    feats, ok = ctx.images("images", images)
    out = SuiteResult()
    labels = np.asarray(labels)
    if (labels >= 0).any():
        names_path = os.path.join(path, "classnames.txt")
        if not os.path.isfile(names_path):
            raise InputError(f"wds:{path}: no classnames.txt beside its shards")
        classnames = [ln.strip() for ln in open(names_path, encoding="utf-8") if ln.strip()]
        tpl_path = os.path.join(path, "zeroshot_classification_templates.txt")
        templates = [ln.strip().replace("{c}", "{}") for ln in open(tpl_path, encoding="utf-8") if ln.strip()] \
            if os.path.isfile(tpl_path) else ["a photo of a {}."]
        if labels.max() >= len(classnames):
            raise InputError(f"wds:{path}: a sample's cls {int(labels.max())} is past the {len(classnames)} class names")
        keep = ok & (labels >= 0)
        out.add("zeroshot", *_zero_shot(feats[keep] @ ctx.classifier(classnames, templates), labels[keep]))
    if any(captions):
        idx = [i for i, c in enumerate(captions) if c and ok[i]]
        texts = [t for i in idx for t in captions[i]]
        owner = np.repeat(np.arange(len(idx)), [len(captions[i]) for i in idx])
        values, per_example = _retrieval(*retrieval_ranks(feats[idx] @ ctx.texts(texts).T, owner))
        out.add("retrieval", {**values, "images": len(idx), "captions": len(texts)}, per_example)
    out.metrics["skipped_images"] = int((~ok).sum())
    return out


# ---- command -------------------------------------------------------------------------------------------

SUITES = {"synthetic": suite_synthetic, "imagefolder": suite_folder, "retrieval": suite_retrieval,
          "imagenet": suite_imagenet, "wds": suite_wds}


def evaluate_in_training(loaded: LoadedModel, suite: str, workers: int = 0) -> dict:
    """The suite's metrics for a model being trained (its weights as they are now; the validation split of a
    synthetic suite, so that a run's curve never looks at the test scenes). The caller sets eval/train mode."""
    kind, arg = suite.split(":", 1)
    cfg = EvalConfig(target=loaded.run, suite=suite, split="val" if kind == "synthetic" else "all", workers=workers)
    with torch.no_grad():
        dim = int(encode_texts(loaded.model, loaded.tokenizer, ["x"], loaded.device).shape[1])
    res = SUITES[kind](arg, SuiteContext(loaded, cfg, FeatureCache(None, kind, "", dim)))
    return {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}


def in_training(suite: str, workers: int = 0):
    """`psdclip train --eval-every`'s evaluation of `suite` (its form checked now, before training starts): a function
    of the model being trained, given to train.loop.train."""
    EvalConfig(target="-", suite=suite)
    return lambda loaded: evaluate_in_training(loaded, suite, workers)


def evaluate(cfg: EvalConfig) -> dict:
    t0 = time.time()
    m = load_model(cfg.target, resolve_device(cfg.device))
    kind, arg = cfg.suite.split(":", 1)
    slug = f"{kind}-{hashlib.md5(os.path.abspath(arg).encode()).hexdigest()[:8]}"
    dim = int(m.model.text_projection.shape[1]) if getattr(m.model, "text_projection", None) is not None else \
        int(encode_texts(m.model, m.tokenizer, ["x"], m.device).shape[1])
    cache = FeatureCache(m.run, slug, m.digest, dim)
    res = SUITES[kind](arg, SuiteContext(m, cfg, cache))
    cache.save()
    result = {"suite": cfg.suite, "split": cfg.split, "kind": kind, "checkpoint": m.checkpoint, "step": m.step,
              "arch": m.arch, "loss": m.loss, "metrics": res.metrics,
              "examples": {k: v.tolist() for k, v in res.per_example.items()}, "time_s": round(time.time() - t0, 2)}
    out_dir = os.path.join(m.run, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{result_name(cfg.suite, cfg.split)}.json")
    write_json(path, result, indent=1)
    result["path"] = path
    if cfg.format == "clip_benchmark":
        result["clip_benchmark"] = write_clip_benchmark(result, os.path.join(out_dir, "clip_benchmark"))
    return result


def clip_benchmark_records(result: dict) -> list[dict]:
    """The result as CLIP_benchmark's result records (its `eval --output` JSON: dataset, model, pretrained, task,
    metrics, language), one per dataset and task: each zero-shot group a zeroshot_classification record (acc1, acc5,
    mean_per_class_recall), the retrieval group a zeroshot_retrieval record (image_retrieval_recall@k: text ->
    image; text_retrieval_recall@k: image -> text)."""
    base = result_name(result["suite"], result["split"])
    groups: dict = {}
    for name, value in result["metrics"].items():
        group, _, metric = name.partition(".")
        groups.setdefault(group, {})[metric] = value
    out = []
    for group, values in groups.items():
        if group.startswith("zeroshot") and "top1" in values:
            metrics = {"acc1": values["top1"], "acc5": values.get("top5"),
                       "mean_per_class_recall": values.get("mean_per_class_recall")}
            task, dataset = "zeroshot_classification", base if group == "zeroshot" else f"{base}_{group}"
        elif group == "retrieval" and any(k.startswith("t2i_R@") for k in values):
            metrics = {**{f"image_retrieval_recall@{k[6:]}": v for k, v in values.items() if k.startswith("t2i_R@")},
                       **{f"text_retrieval_recall@{k[6:]}": v for k, v in values.items() if k.startswith("i2t_R@")}}
            task, dataset = "zeroshot_retrieval", base
        else:
            continue
        out.append({"dataset": dataset, "model": result["arch"], "pretrained": result["checkpoint"], "task": task,
                    "metrics": metrics, "language": "en"})
    return out


def write_clip_benchmark(result: dict, folder: str) -> list[str]:
    """One CLIP_benchmark JSON file per record (as its `--output` template writes them); returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for rec in clip_benchmark_records(result):
        path = os.path.join(folder, f"{rec['dataset']}_{rec['task']}.json")
        write_json(path, rec, indent=1)
        paths.append(path)
    return paths


def format_result(result: dict) -> str:
    lines = [f"{result['suite']}  (checkpoint step {result['step']}, {result['arch']}, loss {result['loss']})", ""]
    width = max(len(k) for k in result["metrics"]) + 2
    for k, v in result["metrics"].items():
        lines.append(f"{k:<{width}}{v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}{v:>10}")
    lines.append(f"\nwritten to {result['path']} in {result['time_s']} s")
    if result.get("clip_benchmark"):
        lines.append(f"CLIP_benchmark records: {', '.join(result['clip_benchmark'])}")
    return "\n".join(lines)
