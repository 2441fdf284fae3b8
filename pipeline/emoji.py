"""The emoji source: real artwork with real words, for the PSD study (`psdclip data emoji`).

Unicode emoji as several vendors draw them: the npm registry's emoji-datasource-<vendor> packages (64 px PNGs of
the same codes across vendors), captioned from emojibase-data's CLDR English labels and tags. Nothing is
committed: `npm pack` fetches the packages at pinned versions into the cache, and each tarball's sha512 must be the
pinned one (the images carry their vendors' licences: see each package's README).

    DIR/images/<vendor>/<hexcode>.png   every emoji every vendor draws (RGBA composited onto white)
    DIR/attributes.parquet              the training pairs: path, caption, caption_kind, vendor, hexcode, label,
                                        image_group, text_group (the oracle's truth: the emoji without its
                                        skin-tone modifiers)
    DIR/urls.csv                        url,caption of the training pairs
    DIR/heldout/id.csv, ood.csv         retrieval lists (image, caption = the CLDR label): the held-out emoji as a
                                        training vendor draws them (in distribution) and as the test vendor does
    DIR/heldout/attributes.parquet      their rows; DIR/emoji.json: config, packages, counts

The split: a fraction of the emoji codes is held out, each in one training vendor's drawing (chosen by the seed);
the other training vendors' drawings of it are trained on, so the in-distribution set asks for a known emoji in a
known style, drawn once not seen, and the test vendor's set for the same emoji in a style never seen (a natural
shift, as ImageNet-R is for ImageNet). Skin-tone and gender variants are kept as their own emoji (true many-to-many
pairs: "waving hand" fits all six); the evaluation counts only the exact image (its full label, tone words
included) as a hit, and the oracle groups a variant with its base emoji.

Captions, drawn per (seed, vendor, code): clean (the label, in one of a few templates, sometimes with tags), partial
(part of the label or only its tags), mismatch (another emoji's clean caption), generic (words that name nothing).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import tarfile
import zlib

import numpy as np
import pandas as pd
from PIL import Image

from ..core.errors import InputError
from ..core.io import write_json
from .config import EmojiConfig
from .sources import Source
from .synth import write_url_list

log = logging.getLogger(__name__)

# name -> (version, the registry's sha512 integrity of its tarball), checked on every fetch
PACKAGES = {
    "emojibase-data": ("17.0.0", "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA=="),
    "emoji-datasource-apple": ("16.0.0", "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw=="),
    "emoji-datasource-google": ("16.0.0", "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "emoji-datasource-twitter": ("16.0.0", "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "emoji-datasource-facebook": ("16.0.0", "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ=="),
}
COMPONENT_GROUP = 2  # CLDR's "component" group: skin-tone swatches and hair parts, not emoji of their own
TONES = ("-1F3FB", "-1F3FC", "-1F3FD", "-1F3FE", "-1F3FF")
CLEAN_TEMPLATES = ("{label}", "{label} emoji", "an emoji of {label}", "{label} icon", "{label}, {tags}")
GENERIC = ("emoji", "icon", "emoticon png", "sticker", "smiley", "emoji icon free download", "unicode character",
           "image", "clipart", "emoji png transparent")


def integrity(path: str) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def fetch(name: str, cache: str, npm: str = "npm") -> str:
    """The package's tarball in `cache` (fetched with `npm pack` unless a copy with the pinned checksum is there);
    one-line errors without npm, without the registry, or for a tarball that is not the pinned one."""
    version, want = PACKAGES[name]
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{name}-{version}.tgz")
    if os.path.isfile(path) and integrity(path) == want:
        return path
    try:
        r = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", cache, "--silent"],
                           capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise InputError(f"--npm {npm}: not found; the emoji source fetches its packages with npm (install Node.js's "
                         f"npm, or give its path)") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"npm pack {name}@{version}: no answer from the registry in 15 minutes") from None
    if r.returncode != 0:
        last = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()][-1:] or ["(no message)"]
        raise InputError(f"npm pack {name}@{version} failed (is the npm registry reachable?): {last[0][:200]}")
    if not os.path.isfile(path):
        raise InputError(f"npm pack {name}@{version}: wrote no {os.path.basename(path)} into {cache}")
    got = integrity(path)
    if got != want:
        os.remove(path)
        raise InputError(f"{name}@{version}: checksum {got[:24]}... is not the pinned {want[:24]}...; refusing it")
    return path


def _norm(code: str) -> str:
    return code.upper().replace("-FE0F", "")


def _base(code: str) -> str:
    for tone in TONES:
        code = code.replace(tone, "")
    return code


def labels(tgz: str) -> pd.DataFrame:
    """hexcode (normalised), label, tags, group of every emoji and skin-tone variant emojibase-data names (the
    component group left out)."""
    with tarfile.open(tgz) as tar:
        data = json.load(tar.extractfile("package/en/data.json"))
    rows = []
    for e in data:
        if e.get("group") in (None, COMPONENT_GROUP):
            continue
        tags = [t for t in e.get("tags", []) if t]
        for item in [e, *e.get("skins", [])]:
            rows.append({"hexcode": _norm(item["hexcode"]), "label": item["label"], "tags": tags,
                         "group": int(e["group"])})
    return pd.DataFrame(rows).drop_duplicates("hexcode")


def vendor_images(tgz: str, vendor: str) -> dict:
    """normalised hexcode -> the tar member of its 64 px PNG."""
    with tarfile.open(tgz) as tar:
        names = set(tar.getnames())
        meta = json.load(tar.extractfile("package/emoji.json"))
    out = {}
    for e in meta:
        for item in [e, *(e.get("skin_variations") or {}).values()]:
            member = f"package/img/{vendor}/64/{item['image']}"
            if item.get(f"has_img_{vendor}", True) and member in names:
                out[_norm(item["unified"])] = member
    return out


def _caption(rng, row: dict, others: pd.DataFrame, cfg: EmojiConfig) -> tuple[str, str, str]:
    """(caption, kind, text group)."""
    u = rng.random()
    if u < cfg.mismatch_frac:
        other = others.iloc[int(rng.integers(len(others)))]
        if other["hexcode"] != row["hexcode"]:
            return _clean(rng, other), "mismatch", _base(other["hexcode"])
    elif u < cfg.mismatch_frac + cfg.generic_frac:
        return str(rng.choice(GENERIC)), "generic", ""
    if rng.random() < cfg.partial_frac:
        words = row["label"].split(":")[0].split()
        if row["tags"] and rng.random() < 0.5:
            k = min(len(row["tags"]), int(rng.integers(1, 4)))
            text = " ".join(str(t) for t in rng.choice(row["tags"], size=k, replace=False))
        else:
            text = " ".join(words[:max(1, len(words) - 1)]) if len(words) > 1 else words[0]
        return text, "partial", _base(row["hexcode"])
    return _clean(rng, row), "clean", _base(row["hexcode"])


def _clean(rng, row) -> str:
    template = str(rng.choice(CLEAN_TEMPLATES))
    tags = ", ".join(list(row["tags"])[:3]) or row["label"]
    return template.format(label=row["label"], tags=tags)


def _rng(cfg: EmojiConfig, *parts) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *(zlib.crc32(str(p).encode()) for p in parts)])


def generate(cfg: EmojiConfig, progress: bool = True) -> dict:
    out = os.path.abspath(cfg.out)
    cache = cfg.cache or os.path.join(out, "packages")
    vendors = [*cfg.train_vendors, cfg.test_vendor]
    tgz = {name: fetch(name, cache, cfg.npm) for name in ["emojibase-data",
                                                         *(f"emoji-datasource-{v}" for v in vendors)]}
    names = labels(tgz["emojibase-data"])
    images = {v: vendor_images(tgz[f"emoji-datasource-{v}"], v) for v in vendors}
    common = names[names["hexcode"].isin(set.intersection(*(set(m) for m in images.values())))].reset_index(drop=True)
    if common.empty:
        raise InputError(f"the packages of {', '.join(vendors)} share no emoji with emojibase-data's labels")
    # write every vendor's drawing of every common emoji (RGBA onto white)
    for v in vendors:
        os.makedirs(os.path.join(out, "images", v), exist_ok=True)
        done = os.path.join(out, "images", v, ".complete")
        if os.path.isfile(done):
            continue
        wanted = set(common["hexcode"])
        codes_of: dict = {}  # tar member -> the codes drawn by it (a fully-qualified and a bare code may share one)
        for code, member in images[v].items():
            if code in wanted:
                codes_of.setdefault(member, []).append(code)
        with tarfile.open(tgz[f"emoji-datasource-{v}"]) as tar:
            for member in tar:
                codes = codes_of.get(member.name) if member.isfile() else None
                if not codes:
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    rgba = im.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    rgb = Image.alpha_composite(white, rgba).convert("RGB")
                for c in codes:
                    rgb.save(os.path.join(out, "images", v, f"{c}.png"))
        open(done, "w").close()
        if progress:
            log.info(f"emoji: {v}: {len(common):,} images")
    # the split: held-out codes, each in one training vendor's drawing
    split = _rng(cfg, "split")
    held = split.random(len(common)) < cfg.heldout_frac
    held_vendor = [cfg.train_vendors[int(k)] for k in split.integers(len(cfg.train_vendors), size=len(common))]
    rows, evals = [], []
    for j, row in common.iterrows():
        for v in cfg.train_vendors:
            path = f"images/{v}/{row['hexcode']}.png"
            if held[j] and v == held_vendor[j]:
                evals.append({"set": "id", "image": f"../{path}", "caption": row["label"], "vendor": v,
                              "hexcode": row["hexcode"]})
                continue
            caption, kind, text_group = _caption(_rng(cfg, "caption", v, row["hexcode"]), row, common, cfg)
            rows.append({"path": path, "caption": caption, "caption_kind": kind, "vendor": v,
                         "hexcode": row["hexcode"], "label": row["label"], "image_group": _base(row["hexcode"]),
                         "text_group": text_group})
        if held[j]:
            evals.append({"set": "ood", "image": f"../images/{cfg.test_vendor}/{row['hexcode']}.png",
                          "caption": row["label"], "vendor": cfg.test_vendor, "hexcode": row["hexcode"]})
    attrs = pd.DataFrame(rows)
    attrs.to_parquet(os.path.join(out, "attributes.parquet"), index=False)
    os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
    ev = pd.DataFrame(evals)
    ev.to_parquet(os.path.join(out, "heldout", "attributes.parquet"), index=False)
    for name in ("id", "ood"):
        ev[ev["set"] == name][["image", "caption"]].to_csv(os.path.join(out, "heldout", f"{name}.csv"), index=False)
    meta = {"config": dataclasses.asdict(cfg), "packages": {n: {"version": PACKAGES[n][0], "integrity": PACKAGES[n][1]}
                                                            for n in tgz},
            "emoji": len(common), "train_pairs": len(attrs), "heldout_emoji": int(held.sum()),
            "caption_kinds": attrs["caption_kind"].value_counts().to_dict(),
            "licences": "the images are the vendors' artwork under their own licences (see each package's README); "
                        "fetched at study time, never committed"}
    write_json(os.path.join(out, "emoji.json"), meta)  # replaced whole: its presence says the source is complete

    write_url_list(out, cfg.base_url)
    return {"emoji": len(common), "train_pairs": len(attrs), "heldout": int(held.sum()),
            "caption_kinds": meta["caption_kinds"], "out": out}


def groups(source: str, by: list[str]) -> pd.DataFrame:
    """The emoji source's truth (truth.py), as attributes.parquet holds it: an emoji's code is its image's group and
    its caption's meaning (`by` does not apply)."""
    attrs = pd.read_parquet(os.path.join(source, "attributes.parquet"))
    return attrs[["path", "image_group", "text_group"]].astype({"image_group": str, "text_group": str})


SOURCE = Source(name="emoji", config=EmojiConfig, make=generate, groups=groups, ignore=("cache", "npm"))
