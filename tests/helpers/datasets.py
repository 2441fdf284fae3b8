"""Shared helpers for tests that build datasets."""
import json
import os
import tarfile

import numpy as np
from PIL import Image

from psdclip.pipeline.config import BuildConfig


def cfg(inputs, out, **kw):
    base = dict(inputs=[str(p) for p in inputs], out=str(out), image_size=32, shard_size=80, processes_count=2,
                thread_count=8, timeout=2.0, progress=False)
    base.update(kw)
    return BuildConfig(**base)


def tar_members(ds):
    """key -> {suffix: bytes} over every shard, failing on a key present twice."""
    out = {}
    for name in sorted(n for n in os.listdir(ds / "shards") if n.endswith(".tar")):  # (beside: NNNNN_stats.json)
        with tarfile.open(ds / "shards" / name) as tf:
            for m in tf:
                key, _, suffix = m.name.partition(".")
                entry = out.setdefault(key, {"shard": name})
                assert suffix not in entry, f"{key}.{suffix} twice"
                entry[suffix] = tf.extractfile(m).read()
    return out


def image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), 128, np.uint8)).save(path)


def make_objectnet(root, folders=("alarm_clock", "banana", "air_freshener")):
    """An ObjectNet-shaped folder: images/<folder>/*.png and the four mapping files, in ObjectNet's formats."""
    for f in folders:
        for k in range(2):
            image(root / "images" / f / f"{k}.png")
    os.makedirs(root / "mappings")
    # ImageNet 2012 ids (lines of imagenet_to_label_2012_v2) are not the class-index order: use a permutation
    perm = np.random.default_rng(0).permutation(1000)
    names = [f"synset {i}" for i in range(1000)]
    names[perm[409]], names[perm[530]], names[perm[954]] = "analog clock", "digital clock", "banana"
    (root / "mappings" / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")
    (root / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(c): int(perm[c]) for c in range(1000)}))
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Alarm clock": "analog clock; digital clock", "Banana": "banana"}))
    (root / "mappings" / "folder_to_objectnet_label.json").write_text(
        json.dumps({"alarm_clock": "Alarm clock", "banana": "Banana", "air_freshener": "Air freshener"}))
    return root
