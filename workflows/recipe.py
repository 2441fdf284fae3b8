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
from ..pipeline.sources import MODULES as SOURCES

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
    known = {"name", "description", *SOURCES, "data", "train", "eval", "index", "serve", "out", "sweep"}
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
    from ..pipeline.config import BuildConfig
    from ..pipeline.sources import sources as source_registry
    from ..train.config import TrainConfig

    ds = os.path.join(out, "dataset")
    cfgs = {}
    given = [name for name in SOURCES if recipe.get(name) is not None]
    if len(given) > 1:
        raise InputError(f"{path}: a recipe has one source: {' or '.join(f'[{n}]' for n in SOURCES)}")
    for name in given:  # the folder of a source: its module's name (synth/, emoji/)
        cfgs[name] = section(recipe, name, source_registry()[name].config, path, out=os.path.join(out, SOURCES[name][0]))
    data = dict(recipe.get("data") or {})
    if not data.get("inputs") and not given:
        raise InputError(f"{path}: [data] needs inputs (URL lists) unless the recipe has a "
                         f"{' or '.join(f'[{n}]' for n in SOURCES)} section")
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
    from ..pipeline.sources import ensure, sources
    from ..pipeline.synth import write_url_list

    kind = next((name for name in SOURCES if name in cfgs), None)
    if kind is None:
        build(cfgs["data"])
        return None
    src = ensure(sources()[kind], cfgs[kind])  # made, or the one this recipe describes reused
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
