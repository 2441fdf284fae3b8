"""ImageNet and its distribution-shift variants, as the folders their authors ship, mapped onto the 1000 classes.

Layouts recognised by `imagenet_layout(path)`:
- ImageNet (val), ImageNet-Sketch: one folder per WordNet id (n01440764 ...), all 1000 classes;
- ImageNet-R, ImageNet-A (and any other subset): WordNet-id folders for 200 of the 1000 classes; the zero-shot
  classifier covers only those classes, as their authors evaluate;
- ImageNetV2: folders named 0 ... 999 (the class index);
- ObjectNet (objectnet-1.0/, or its images/ folder): folders named by ObjectNet class, mapped to ImageNet through
  the `mappings/` files ObjectNet ships; the 113 classes that overlap ImageNet are kept, a class's score is the
  best score of its ImageNet classes, and the 2-pixel border of every image is cropped away.

The 1000 WordNet ids, in class-index order, come from timm (an open_clip dependency); the class names and the
80 prompt templates from open_clip.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WNID = re.compile(r"^n\d{8}$")
OBJECTNET_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                   "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


@dataclass
class Variant:
    """What to evaluate: images, their labels (0..len(groups)-1), the ImageNet classes each label stands for."""
    name: str
    files: list
    labels: np.ndarray
    groups: list          # groups[label] = ImageNet class indices whose best score is that label's score
    border: int = 0       # pixels cropped from every side before the model's transform

    @property
    def classes(self) -> list:
        """The ImageNet class indices the zero-shot classifier needs, sorted."""
        return sorted({c for g in self.groups for c in g})


def imagenet_wnids() -> list:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def collect_folders(path, folders, label_of):
    files, labels = [], []
    for folder in folders:
        imgs = _images(os.path.join(path, folder))
        if not imgs:
            raise InputError(f"{path}/{folder}: empty class folder (no images)")
        files += [os.path.join(path, folder, f) for f in imgs]
        labels += [label_of[folder]] * len(imgs)
    return files, np.array(labels, dtype=np.int64)


def _objectnet_mappings(path):
    for base in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(os.path.join(base, "mappings", OBJECTNET_FILES[0])):
            images = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else path
            return os.path.join(base, "mappings"), images
    return None, None


def objectnet_layout(mappings, images) -> Variant:
    missing = [f for f in OBJECTNET_FILES if not os.path.isfile(os.path.join(mappings, f))]
    if missing:
        raise InputError(f"{mappings}: ObjectNet mapping file(s) missing: {', '.join(missing)}")
    try:
        with open(os.path.join(mappings, OBJECTNET_FILES[0])) as f:
            folder_to_label = json.load(f)
        with open(os.path.join(mappings, OBJECTNET_FILES[1])) as f:
            label_to_imagenet = json.load(f)
        with open(os.path.join(mappings, OBJECTNET_FILES[2])) as f:
            class_to_2012 = {int(v): int(k) for k, v in json.load(f).items()}
        with open(os.path.join(mappings, OBJECTNET_FILES[3])) as f:
            name_to_class = {line.strip(): class_to_2012[i] for i, line in enumerate(f) if line.strip()}
    except (ValueError, KeyError, AttributeError) as e:
        raise InputError(f"{mappings}: ObjectNet mapping files do not parse ({type(e).__name__}: {e})") from None
    label_to_folder = {v: k for k, v in folder_to_label.items()}
    groups, label_of = [], {}
    for label in sorted(label_to_imagenet):
        folder = label_to_folder.get(label)
        if folder is None or not os.path.isdir(os.path.join(images, folder)):
            continue
        names = [n.strip() for n in label_to_imagenet[label].split(";") if n.strip()]
        unknown = [n for n in names if n not in name_to_class]
        if unknown:
            raise InputError(f"{mappings}/{OBJECTNET_FILES[1]}: ImageNet class {unknown[0]!r} (for {label!r}) is not "
                             f"in {OBJECTNET_FILES[3]}")
        label_of[folder] = len(groups)
        groups.append(sorted(name_to_class[n] for n in names))
    if not groups:
        raise InputError(f"{images}: no ObjectNet class folder that overlaps ImageNet")
    files, labels = collect_folders(images, list(label_of), label_of)
    return Variant("objectnet", files, labels, groups, border=2)


def imagenet_layout(path) -> Variant:
    if not os.path.isdir(path):
        raise InputError(f"imagenet:{path}: no such folder")
    mappings, images = _objectnet_mappings(path)
    if mappings:
        return objectnet_layout(mappings, images)
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not folders:
        raise InputError(f"imagenet:{path}: no class subfolders")
    if all(f.isdigit() for f in folders):  # ImageNetV2: folders are class indices
        bad = [f for f in folders if not 0 <= int(f) < 1000]
        if bad:
            raise InputError(f"imagenet:{path}: folder {bad[0]!r} is not an ImageNet class index (0..999)")
        classes = sorted(int(f) for f in folders)
        label_of = {f: classes.index(int(f)) for f in folders}
        files, labels = collect_folders(path, folders, label_of)
        return Variant("imagenet-v2" if len(classes) == 1000 else "imagenet-subset", files, labels,
                      [[c] for c in classes])
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    strange = [f for f in folders if f not in index]
    if strange:
        why = "not an ImageNet-1k WordNet id" if WNID.match(strange[0]) else "not a WordNet id (n########)"
        raise InputError(f"imagenet:{path}: folder {strange[0]!r} is {why}; give ImageNet(-V2/-R/-A/-Sketch) or "
                         f"ObjectNet folders, or an imagefolder: suite with classnames.txt")
    classes = sorted(index[f] for f in folders)
    label_of = {f: classes.index(index[f]) for f in folders}
    files, labels = collect_folders(path, folders, label_of)
    return Variant("imagenet" if len(classes) == 1000 else f"imagenet-subset-{len(classes)}", files, labels,
                  [[c] for c in classes])


def group_scores(logits: np.ndarray, groups: list, columns: list) -> np.ndarray:
    """logits over `columns` (ImageNet class indices) -> one score per group: the best of its classes."""
    col = {c: j for j, c in enumerate(columns)}
    if all(len(g) == 1 for g in groups):
        return logits[:, [col[g[0]] for g in groups]]
    return np.stack([logits[:, [col[c] for c in g]].max(axis=1) for g in groups], axis=1)
