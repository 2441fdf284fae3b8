"""Ground truth of a dataset built from a source whose truth is known, for the PSD study's oracle control
(`psdclip data oracle`; `psdclip train --oracle-targets`): each successful sample's image group (what its picture
shows) and text group (what its caption means), keyed like the manifest.

- Synthetic source: a group is the scene's values of `by` (default shape and colour). A clean, partial or shared
  caption describes (part of) its own scene: its image's group; a mismatched caption describes another scene,
  re-drawn from the seed as the source drew it: that scene's group; a low-information caption names nothing: none.
- A source whose attributes.parquet has image_group and text_group columns (the emoji source) gives them as they are.

A sample is matched to its source row by the URL's path (the longest tail of the URL that is a source path).
"""
from __future__ import annotations

import os

import pandas as pd

from ..core.errors import InputError
from ..core.io import atomic_path
from .reader import manifest_batches
from .sources import source_of
from .status import SUCCESS


def source_groups(source: str, by: list[str]) -> pd.DataFrame:
    """path, image_group, text_group of every row of a source's attributes.parquet (the source's own rule)."""
    if not os.path.isfile(os.path.join(source, "attributes.parquet")):
        raise InputError(f"--source {source}: no attributes.parquet (not a synthetic or emoji source)")
    return source_of(source).groups(source, by)


def write_oracle(dataset: str, source: str, out: str, by: list[str]) -> dict:
    """Write OUT (Parquet: key, image_group, text_group) for every successful sample of DATASET."""
    groups = source_groups(source, by)
    table = dict(zip(groups["path"], zip(groups["image_group"], groups["text_group"])))
    rows, unmatched = [], 0
    for frame in manifest_batches(dataset, columns=["key", "url", "status"]):
        frame = frame[frame["status"] == SUCCESS]
        for key, url in zip(frame["key"], frame["url"]):
            parts = str(url).split("?", 1)[0].split("/")
            hit = next((table[t] for t in ("/".join(parts[k:]) for k in range(3, len(parts))) if t in table), None)
            if hit is None:
                unmatched += 1
                continue
            rows.append((key, *hit))
    if unmatched:
        raise InputError(f"{dataset}: {unmatched:,} successful sample(s) match no row of --source {source} (built "
                         f"from another source?)")
    frame = pd.DataFrame(rows, columns=["key", "image_group", "text_group"])
    with atomic_path(out) as tmp:
        frame.to_parquet(tmp, index=False)
    share = float((frame["image_group"] == frame["text_group"]).mean()) if len(frame) else 0.0
    return {"samples": len(frame), "groups": int(frame["image_group"].nunique()), "caption_fits_image": share,
            "out": out}
