"""Recipes: YAML files that compose the stages. Each section is the typed config of one stage (the same
dataclasses the CLI is generated from), so a recipe is validated exactly like the command line.

    synthetic: {n: 3000, heldout: 300, seed: 0}        # optional: generate and serve the synthetic source
    data:      {inputs: [...], image_size: 64, ...}     # BuildConfig (inputs may be omitted with synthetic)
    train:     {model: tiny, loss: psd, steps: 1000, ...}   # TrainConfig (data and out are filled in)
    eval:      {suites: [synthetic]}                    # suites; "synthetic" means the recipe's source
    index:     {max_memory: 2GB}                        # IndexBuildConfig (checkpoint, data, out filled in)
    serve:     {port: 8000}                             # ServeConfig, only with `psdclip run --serve`
    out: runs/NAME
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..core.errors import InputError

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def find_recipe(path: str) -> str:
    if os.path.isfile(path):
        return path
    bundled = os.path.join(RECIPES, path if path.endswith(".yaml") else path + ".yaml")
    if os.path.isfile(bundled):
        return bundled
    names = sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml"))
    raise InputError(f"{path}: no such recipe file (bundled recipes: {', '.join(names)})")


def load_recipe(path: str) -> dict:
    from .config import load_yaml

    recipe = load_yaml(find_recipe(path))
    known = {"name", "description", "synthetic", "emoji", "data", "train", "eval", "index", "serve", "out", "sweep"}
    unknown = set(recipe) - known
    if unknown:
        raise InputError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return recipe


def section(recipe: dict, name: str, cls, path: str, **fill):
    from .config import build_config

    values = dict(recipe.get(name) or {})
    for k, v in fill.items():
        values.setdefault(k, v)
    return build_config(cls, values, {}, source=f"{path} [{name}]")


@dataclass
class RunConfig:
    """psdclip run: an end-to-end recipe: data -> train -> eval -> index (-> serve)."""

    recipe: str = field(default="", metadata={"help": "recipe YAML (a path or a bundled name: demo, cc3m, ...)",
                                              "positional": True})
    out: str = field(default="", metadata={"help": "output folder (default: the recipe's out)"})
    serve: bool = field(default=False, metadata={"help": "start the service at the end"})
    check: bool = field(default=False, metadata={"help": "only parse and validate the recipe"})

    def __post_init__(self):
        if not self.recipe:
            raise InputError("RECIPE is required")


def validate(path: str, recipe: dict, out: str) -> dict:
    from ..index.config import IndexBuildConfig, ServeConfig
    from ..pipeline.config import BuildConfig, EmojiConfig, SynthConfig
    from ..train.config import TrainConfig

    ds = os.path.join(out, "dataset")
    cfgs = {}
    if recipe.get("synthetic") is not None:
        cfgs["synthetic"] = section(recipe, "synthetic", SynthConfig, path, out=os.path.join(out, "synth"))
    if recipe.get("emoji") is not None:
        if "synthetic" in cfgs:
            raise InputError(f"{path}: a recipe has one source: [synthetic] or [emoji]")
        cfgs["emoji"] = section(recipe, "emoji", EmojiConfig, path, out=os.path.join(out, "emoji"))
    data = dict(recipe.get("data") or {})
    if not data.get("inputs") and "synthetic" not in cfgs and "emoji" not in cfgs:
        raise InputError(f"{path}: [data] needs inputs (URL lists) unless the recipe has a [synthetic] or [emoji] "
                         f"section")
    cfgs["data"] = section({"data": data}, "data", BuildConfig, path, out=ds, inputs=data.get("inputs") or [])
    if recipe.get("train") is not None:
        cfgs["train"] = section(recipe, "train", TrainConfig, path, data=ds, out=os.path.join(out, "run"))
    if recipe.get("index") is not None:
        cfgs["index"] = section(recipe, "index", IndexBuildConfig, path, checkpoint=os.path.join(out, "run"), data=ds,
                                out=os.path.join(out, "index"))
    if recipe.get("serve") is not None:
        cfgs["serve"] = section(recipe, "serve", ServeConfig, path, indices=[os.path.join(out, "index")])
    suites = (recipe.get("eval") or {}).get("suites", [])
    for s in suites:
        kind = s.split(":", 1)[0].split("=", 1)[-1]
        if kind != "synthetic" and kind not in ("imagefolder", "imagenet", "retrieval", "wds"):
            raise InputError(f"{path} [eval]: unknown suite {s!r}")
    cfgs["suites"] = suites
    return cfgs


def prepare_dataset(cfgs: dict) -> str | None:
    """Build the recipe's dataset; with a [synthetic] or [emoji] section, first generate (or fetch) the source and
    serve it on 127.0.0.1 for the download. Returns the source folder, if any."""
    import dataclasses

    from ..pipeline.build import already_built, build
    from ..pipeline.serve import serving
    from ..pipeline.synth import generate, write_url_list

    kind = "synthetic" if "synthetic" in cfgs else "emoji" if "emoji" in cfgs else None
    if kind is None:
        build(cfgs["data"])
        return None
    src = cfgs[kind].out
    meta = os.path.join(src, "synth.json" if kind == "synthetic" else "emoji.json")
    if not os.path.isfile(meta):
        if kind == "synthetic":
            generate(cfgs[kind])
        else:
            from ..pipeline.emoji import generate as fetch_emoji

            fetch_emoji(cfgs[kind])
    else:  # a rerun reuses the source, but only the one this recipe describes
        from ..core.io import read_json

        before = read_json(meta).get("config", {})
        wanted = dataclasses.asdict(cfgs[kind])
        changed = sorted(k for k in wanted if k in before and before[k] != wanted[k] and k not in ("cache", "npm"))
        if changed:
            raise InputError(f"{src}: the {kind} source was made with other options ({', '.join(changed)}); "
                             f"delete it (and the dataset built from it) or use another output folder")
    listed = os.path.join(src, "urls-recipe.csv")
    if os.path.isfile(listed) and already_built(dataclasses.replace(cfgs["data"], inputs=[listed])):
        return src  # nothing to download: the source is not served (another process of the sweep may serve it)
    with serving(src, again=listed) as base:
        build(dataclasses.replace(cfgs["data"], inputs=[write_url_list(src, base, "urls-recipe.csv")]))
    return src


def run_recipe(cfg: RunConfig) -> int:
    recipe = load_recipe(cfg.recipe)
    out = os.path.abspath(cfg.out or recipe.get("out") or os.path.join("runs", recipe.get("name", "recipe")))
    cfgs = validate(cfg.recipe, recipe, out)
    if cfg.check:
        print(f"{cfg.recipe}: valid ({', '.join(k for k in cfgs if k != 'suites')}; suites: {cfgs['suites']})")
        return 0
    src = prepare_dataset(cfgs)
    if "train" in cfgs:
        from ..eval.config import EvalConfig
        from ..eval.evaluate import evaluate, format_result

        from .runs import suite_spec, train_run

        train_run(cfgs["train"])

        for suite in cfgs["suites"]:
            spec = suite_spec(suite, src)
            print(format_result(evaluate(EvalConfig(target=cfgs["train"].out, suite=spec))))
    if "index" in cfgs:
        from .commands import cmd_index_build

        cmd_index_build(cfgs["index"])
    if cfg.serve and "index" in cfgs:
        from ..index.config import ServeConfig
        from .commands import cmd_serve

        cmd_serve(cfgs.get("serve") or ServeConfig(indices=[cfgs["index"].out]))
    print(f"recipe done; everything is in {out}")
    return 0
