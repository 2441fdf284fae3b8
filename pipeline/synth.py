"""The synthetic source, the embedded default: procedural scenes of shapes with compositional attributes,
captions with web-like noise, and distribution-shifted renderings of held-out scenes.

Everything is deterministic from the seed: scene i is drawn from numpy's generator seeded by (seed, i),
so any image can be re-rendered alone and the same seed gives byte-identical files.

    DIR/images/NNNN/NNNNNNN.jpg   training images        DIR/attributes.parquet  ground truth + caption
    DIR/urls.csv                  url,caption            DIR/synth.json          config + vocabulary
    DIR/heldout/<variant>/NNNNNNN.jpg and DIR/heldout/attributes.parquet  (variants: SHIFTS)
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import sys

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from .config import SynthConfig
from .sources import Source
from ..core.errors import InputError
from ..core.io import read_json, write_json

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 220), "yellow": (238, 210, 20),
           "purple": (148, 73, 189), "orange": (255, 127, 14)}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20), "beige": (222, 203, 164)}
SIZES = ("small", "large")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
COUNTS = (1, 2, 3)
SHIFTS = ("base", "sketch", "texture", "colorshift", "blur", "noise")

SHAPE_WORDS = {"circle": ("circle", "disc", "round dot"),
               "square": ("square", "box", "block"),
               "triangle": ("triangle", "three-sided shape", "wedge"),
               "star": ("star", "five-pointed star"),
               "hexagon": ("hexagon", "six-sided shape"),
               "cross": ("cross", "plus sign")}
COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"), "blue": ("blue", "azure"),
                "yellow": ("yellow", "golden"), "purple": ("purple", "violet"), "orange": ("orange", "amber")}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
LOWINFO = ("image", "photo", "untitled", "click here", "download", "IMG_{n}.jpg", "DSC{n}", "picture {n}",
           "view image", "thumbnail")
FULL_TEMPLATES = (
    "a photo of {count} {size} {colour} {shape} in the {position}",
    "{count} {colour} {shape} on a {bg} background",
    "{count} {size} {colour} {shape}, {position}, {bg} backdrop",
    "an image showing {count} {colour} {shape} on the {position}",
    "{bg} background with {count} {size} {colour} {shape}",
)
PARTIAL_TEMPLATES = ("a {colour} shape", "{count} {shape}", "something {colour} on the {position}",
                     "a picture of {shape}", "{size} {colour} {shape}")
SHARED_TEMPLATES = ("a {colour} shape", "some {shape}", "colourful geometric shapes", "abstract shapes")


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    if word.endswith("x") or word.endswith("s"):
        return word + "es"
    return word + "s"


def sample_scene(rng: np.random.Generator, distractor_frac: float = 0.4, backgrounds: int = len(BACKGROUNDS),
                 positions: int = len(POSITIONS), max_count: int = len(COUNTS)) -> dict:
    p = np.array((0.6, 0.25, 0.15))[:max_count]
    count = int(rng.choice(COUNTS[:max_count], p=p / p.sum()))
    size = "small" if count == 3 else str(rng.choice(SIZES))
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    scene = {"shape": shape, "colour": colour, "size": size, "count": count,
             "position": str(rng.choice(list(POSITIONS) if positions >= len(POSITIONS) else
                                        ["center", "left", "right", "top", "bottom"][:positions])),
             "background": str(rng.choice(list(BACKGROUNDS)[:backgrounds])),
             "distractor_shape": "", "distractor_colour": ""}
    if rng.random() < distractor_frac:
        scene["distractor_shape"] = str(rng.choice([s for s in SHAPES if s != shape]))
        scene["distractor_colour"] = str(rng.choice([c for c in COLOURS if c != colour]))
    return scene


def _words(scene: dict, rng: np.random.Generator) -> dict:
    n = scene["count"]
    return {"count": str(rng.choice(COUNT_WORDS[n])), "size": scene["size"],
            "colour": str(rng.choice(COLOUR_WORDS[scene["colour"]])),
            "shape": _plural(str(rng.choice(SHAPE_WORDS[scene["shape"]])), n),
            "position": scene["position"], "bg": scene["background"]}


def describe(scene: dict, rng: np.random.Generator, partial: bool = False) -> str:
    words = _words(scene, rng)
    template = str(rng.choice(PARTIAL_TEMPLATES if partial else FULL_TEMPLATES))
    text = template.format(**words)
    if not partial and scene["distractor_shape"] and rng.random() < 0.5:
        text += f" next to a {rng.choice(COLOUR_WORDS[scene['distractor_colour']])} " \
                f"{rng.choice(SHAPE_WORDS[scene['distractor_shape']])}"
    return text


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, start = 4, math.pi / 4
    elif shape == "triangle":
        k, start = 3, -math.pi / 2
    elif shape == "hexagon":
        k, start = 6, 0.0
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5 + rot
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    elif shape == "cross":
        w = r * 0.35
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    else:
        raise ValueError(shape)
    return [(cx + r * math.cos(start + rot + 2 * math.pi * i / k), cy + r * math.sin(start + rot + 2 * math.pi * i / k))
            for i in range(k)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill, outline=None, width=1):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill, outline=outline, width=width)


def render(scene: dict, size: int, rng: np.random.Generator, variant: str = "base",
           shape_scale: float = 1.0) -> Image.Image:
    """Draw a scene. Variants keep the shapes (the classification target) and change the rendering;
    shape_scale enlarges the shapes (the task's difficulty at low resolution)."""
    bg = BACKGROUNDS[scene["background"]]
    sketch = variant == "sketch"
    img = Image.new("RGB", (size, size), (255, 255, 255) if sketch else bg)
    draw = ImageDraw.Draw(img)
    if variant == "texture":
        step = max(4, size // 12)
        alt = tuple(int(c * 0.6 + 100 * (i % 2)) for i, c in enumerate(bg))
        for k in range(-size, size * 2, step * 2):
            draw.polygon([(k, 0), (k + step, 0), (k + step - size, size), (k - size, size)], fill=alt)
    radius = size * (0.10 if scene["size"] == "small" else 0.2) * shape_scale
    px, py = POSITIONS[scene["position"]]
    n = scene["count"]
    for j in range(n):
        ang = 2 * math.pi * j / n + rng.uniform(0, 2 * math.pi)
        spread = 0.0 if n == 1 else radius * 1.15
        cx = px * size + spread * math.cos(ang) + rng.uniform(-0.03, 0.03) * size
        cy = py * size + spread * math.sin(ang) + rng.uniform(-0.03, 0.03) * size
        rot = rng.uniform(-0.3, 0.3)
        if sketch:
            _draw(draw, scene["shape"], cx, cy, radius, rot, None, (0, 0, 0), max(1, size // 48))
        else:
            _draw(draw, scene["shape"], cx, cy, radius, rot, COLOURS[scene["colour"]])
    if scene["distractor_shape"]:
        dx, dy = 1 - px, 1 - py
        if (dx, dy) == (0.5, 0.5):
            dx, dy = 0.2, 0.2
        r = size * 0.08
        col = None if sketch else COLOURS[scene["distractor_colour"]]
        _draw(draw, scene["distractor_shape"], dx * size, dy * size, r, 0.0, col,
              (0, 0, 0) if sketch else None, max(1, size // 48))
    if variant == "colorshift":
        hsv = np.array(img.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 85) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    elif variant == "blur":
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 40))
    elif variant == "noise":
        arr = np.asarray(img).astype(np.int16) + rng.normal(0, 40, (size, size, 3)).astype(np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def mismatch_scene(cfg: SynthConfig, i: int) -> dict:
    """The other scene a mismatched caption of pair i describes (drawn from its own seed: the oracle's truth reads it
    back, pipeline/truth.py)."""
    return sample_scene(np.random.default_rng([cfg.seed, 7, i]), *_difficulty(cfg))


def caption_for(i: int, scene: dict, cfg: SynthConfig, rng: np.random.Generator) -> tuple[str, str]:
    """(caption, kind) with kind in clean | partial | mismatch | shared | lowinfo."""
    u = rng.random()
    if u < cfg.mismatch_frac:
        return describe(mismatch_scene(cfg, i), rng), "mismatch"
    u -= cfg.mismatch_frac
    if u < cfg.shared_frac:
        tpl = str(rng.choice(SHARED_TEMPLATES))
        return tpl.format(colour=scene["colour"], shape=_plural(scene["shape"], 2)), "shared"
    u -= cfg.shared_frac
    if u < cfg.lowinfo_frac:
        return str(rng.choice(LOWINFO)).format(n=int(rng.integers(1000, 9999))), "lowinfo"
    if rng.random() < cfg.partial_frac:
        return describe(scene, rng, partial=True), "partial"
    return describe(scene, rng), "clean"


def _difficulty(cfg: SynthConfig) -> tuple:
    return cfg.distractor_frac, cfg.backgrounds, cfg.positions, cfg.max_count


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate(cfg: SynthConfig, progress: bool = True) -> dict:
    """Write the synthetic source into cfg.out. Returns a summary."""
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {cfg.out}: is a file, not a directory")
    foreign = [e for e in (os.listdir(out) if os.path.isdir(out) else [])
               if e not in ("images", "heldout", "attributes.parquet", "synth.json") and not e.startswith("urls")]
    if foreign:  # what a source (or one cut off) holds is rewritten; anything else is the user's
        raise InputError(f"--out {cfg.out}: a folder that is not a synthetic source (it holds {foreign[0]!r}); give "
                         f"a new or empty one")
    try:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {cfg.out}: cannot create it ({err.strerror or err})") from None
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n + cfg.heldout * len(SHIFTS), desc="synth", unit="img", file=sys.stderr)
    for i in range(cfg.n):
        rng = np.random.default_rng([cfg.seed, 1, i])
        scene = sample_scene(rng, *_difficulty(cfg))
        caption, kind = caption_for(i, scene, cfg, rng)
        true_caption = describe(scene, np.random.default_rng([cfg.seed, 2, i]))
        rel = f"images/{i // 1000:04d}/{i:07d}.jpg"
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_jpeg(render(scene, cfg.image_size, rng, shape_scale=cfg.shape_scale)))
        rows.append({"id": i, "path": rel, "caption": caption, "caption_kind": kind, "true_caption": true_caption,
                     **scene})
        if bar:
            bar.update()
    attrs = pd.DataFrame(rows)
    attrs.to_parquet(os.path.join(out, "attributes.parquet"), index=False)
    held = []
    for j in range(cfg.heldout):
        scene = sample_scene(np.random.default_rng([cfg.seed, 3, j]), *_difficulty(cfg))
        for variant in SHIFTS:
            rng = np.random.default_rng([cfg.seed, 4, j])  # same placement in every variant
            rel = f"heldout/{variant}/{j:07d}.jpg"
            os.makedirs(os.path.join(out, "heldout", variant), exist_ok=True)
            with open(os.path.join(out, rel), "wb") as f:
                f.write(_jpeg(render(scene, cfg.image_size, rng, variant, cfg.shape_scale)))
            if bar:
                bar.update()
        held.append({"id": j, **scene, "true_caption": describe(scene, np.random.default_rng([cfg.seed, 5, j]))})
    if cfg.heldout:
        pd.DataFrame(held).to_parquet(os.path.join(out, "heldout", "attributes.parquet"), index=False)
    if bar:
        bar.close()
    meta = {"config": dataclasses.asdict(cfg), "shapes": list(SHAPES), "colours": list(COLOURS),
            "backgrounds": list(BACKGROUNDS), "sizes": list(SIZES), "positions": list(POSITIONS),
            "counts": list(COUNTS), "shifts": list(SHIFTS),
            "caption_kinds": attrs["caption_kind"].value_counts().to_dict()}
    write_json(os.path.join(out, "synth.json"), meta)  # replaced whole: its presence says the source is complete
    write_url_list(out, cfg.base_url)
    return {"images": cfg.n, "heldout": cfg.heldout, "caption_kinds": meta["caption_kinds"], "out": out}


def write_url_list(directory: str, base_url: str, name: str = "urls.csv") -> str:
    """Write DIR/<name> (url,caption) pointing at base_url; returns its path."""
    attrs = pd.read_parquet(os.path.join(directory, "attributes.parquet"), columns=["path", "caption"])
    urls = base_url.rstrip("/") + "/" + attrs["path"]
    path = os.path.join(directory, name)
    pd.DataFrame({"url": urls, "caption": attrs["caption"]}).to_csv(path, index=False)
    return path


def groups(source: str, by: list[str]) -> pd.DataFrame:
    """The synthetic source's truth (truth.py): path, image_group, text_group of every row of attributes.parquet. A
    group is the scene's values of `by`; a mismatched caption's text group is the other scene's, a low-information
    caption's none."""
    attrs = pd.read_parquet(os.path.join(source, "attributes.parquet"))
    unknown = [b for b in by if b not in attrs.columns]
    if unknown:
        raise InputError(f"--by {','.join(unknown)}: not scene attributes of {source} (it has "
                         f"{', '.join(c for c in attrs.columns if c not in ('id', 'path', 'caption'))})")
    cfg = SynthConfig(**{k: v for k, v in read_json(os.path.join(source, "synth.json"))["config"].items()})

    def group(scene) -> str:
        return "|".join(str(scene[b]) for b in by)

    image = [group(r) for r in attrs[by].to_dict("records")]
    text = list(image)
    for j, (i, kind) in enumerate(zip(attrs["id"], attrs["caption_kind"])):
        if kind == "mismatch":  # the other scene, drawn as caption_for drew it
            text[j] = group(mismatch_scene(cfg, int(i)))
        elif kind == "lowinfo":
            text[j] = ""
    return pd.DataFrame({"path": attrs["path"], "image_group": image, "text_group": text})


SOURCE = Source(name="synthetic", config=SynthConfig, make=generate, groups=groups)
