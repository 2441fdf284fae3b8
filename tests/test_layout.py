"""The house's seams, checked on the source: the base imports no stage, a stage imports only from the base and the
stages to its left (by their public names), and the dataset's shard path, dataset.json parsing and image-field choice
each live in one module."""
import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["core", "pipeline", "train", "eval", "index", "workflows"]
# what a later stage may use of the pipeline: the dataset format, its reader, subsets, statuses (and configs for the CLI)
PIPELINE_PUBLIC = {"format", "reader", "subsets", "status", "synth"}  # synth: the synthetic source's vocabulary


def _imports(path: Path):
    """(stage, module) of every psdclip import of a file, resolved from relative or absolute form (a file of a
    stage's sub-package, train/objectives/psd.py, resolves from its own package)."""
    package = list(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module or "").startswith("psdclip."):
                continue
            parts = node.module.split(".")[1:]
        else:
            base = package[:len(package) - (node.level - 1)]
            if not base:
                parts = (node.module or "").split(".")
            else:
                parts = base + (node.module.split(".") if node.module else [])
        if len(parts) == 1:  # from . import x, y (or from .. import stage)
            for alias in node.names:
                yield parts[0], alias.name, node.lineno
        else:
            yield parts[0], parts[1], node.lineno


def _files(stage):
    return sorted((ROOT / stage).rglob("*.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_base_and_stages_to_its_left(stage):
    allowed = set(STAGES[:STAGES.index(stage) + 1])
    bad = []
    for f in _files(stage):
        for other, module, line in _imports(f):
            if other not in allowed:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports psdclip.{other}.{module}")
            elif stage in ("train", "eval", "index") and other == "pipeline" and module not in PIPELINE_PUBLIC:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports the pipeline's internal {module}")
            elif stage in ("eval", "index") and other == "train" and module not in ("checkpoint", "loading",
                                                                                   "models"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports train.{module} ({stage} may use checkpoint and "
                           f"model loading only)")
    assert not bad, "\n".join(bad)


def test_no_absolute_imports_between_stages():
    """Imports between the stages are relative (`from ..core import storage`): an editor, grep and static tools follow
    them to a file (there is no psdclip/ folder on disk)."""
    bad = [f"{f.relative_to(ROOT)}:{n + 1}" for s in STAGES for f in _files(s)
           for n, line in enumerate(f.read_text().splitlines()) if re.match(r"\s*(from|import) psdclip\.", line)]
    assert not bad, bad


def test_the_dataset_format_is_spelled_once():
    """The shard path, dataset.json parsing and the image-field choice exist in pipeline/format.py alone."""
    patterns = {"shard path": r""":05d\}\.(tar|\{'parquet'|\{shard_extension)""",
                "dataset.json read": r"""["']dataset\.json["']""",
                "image-field fallback": r"""get\(["']jpg["']\)\s*or"""}
    found = {name: [] for name in patterns}
    for s in STAGES:
        for f in _files(s):
            text = f.read_text()
            for name, pat in patterns.items():
                if re.search(pat, text):
                    found[name].append(f"{s}/{f.name}")
    assert found["shard path"] == ["pipeline/format.py"], found
    assert found["image-field fallback"] == [], found
    assert set(found["dataset.json read"]) <= {"pipeline/format.py"}, found


def test_every_module_imports_and_states_its_job():
    import psdclip

    for stage in STAGES:
        pkg = importlib.import_module(f"psdclip.{stage}")
        for info in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"psdclip.{stage}.{info.name}")
            doc = (mod.__doc__ or "").strip()
            assert doc, f"psdclip.{stage}.{info.name} has no docstring"
    assert psdclip  # the namespace package itself


def test_readme_names_every_module_where_things_live():
    """README's "Where things live" table names every module of every stage (as `name`, in its stage's row)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Where things live")
    table = readme[start:readme.index("\n\n", readme.index("| folder |", start))]
    rows = {line.split("|")[1].strip(" `/"): line for line in table.splitlines() if line.startswith("| `")}
    missing = [f"{s}/{f.relative_to(ROOT / s)}" for s in STAGES for f in _files(s)
               if f.stem != "__init__" and f"`{f.stem}`" not in rows.get(s, "")]
    assert not missing, f"README's 'Where things live' does not name: {missing}"


def test_commands_live_in_workflows_and_the_stages_never_print():
    """Every `cmd_*` function is in workflows/ (stdout belongs to the commands); the stages' modules log, never print."""
    bad = []
    for s in STAGES[:-1]:
        for f in _files(s):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} defines {node.name}")
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} prints")
    assert not bad, "\n".join(bad)


def _module(f: Path) -> str:
    return ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _project_imports(f: Path):
    """(imported module, ImportFrom node, inside a function) of every relative import of a project file."""
    package = _module(f).split(".")[:-1] if f.name != "__init__.py" else _module(f).split(".")
    tree = ast.parse(f.read_text())
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for target in [".".join(base)] * bool(node.module) + [".".join(base + [a.name]) for a in node.names]:
                yield target, node, id(node) in local


def test_no_import_circle_at_module_level_or_hidden_in_functions():
    """The project's modules and their imports, module-level and function-local alike, form no circle."""
    files = {_module(f): f for s in STAGES for f in _files(s)}
    graph = {m: {t for t, _, _ in _project_imports(f) if t in files and t != m} for m, f in files.items()}
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_function_local_imports_only_where_start_up_needs_them():
    """A project import inside a function is for start-up time: the CLI's lazy commands (workflows/), the light
    modules the CLI reads its options from (config modules, train/objectives/), or an import that carries its reason
    (`# lazy: ...`: torch or open_clip only when a model is used). Everywhere else imports are at module level, where
    they show the module's arrows."""
    bad = []
    for s in STAGES[:-1]:
        for f in _files(s):
            rel = str(f.relative_to(ROOT))
            if f.name == "config.py" or rel.startswith("train/objectives/"):
                continue
            lines = f.read_text().splitlines()
            for _, node, local in _project_imports(f):
                if local and "# lazy:" not in lines[node.lineno - 1]:
                    bad.append(f"{rel}:{node.lineno}")
    assert not bad, f"function-local project imports without a `# lazy:` reason: {sorted(set(bad))}"


def test_objectives_shard_formats_and_sources_are_registered_modules():
    """A new objective, shard format or source is one module plus its registration line: every registered name has
    its module, the module declares what the registry says, and no module of those kinds is left unregistered."""
    from psdclip.pipeline import format as fmt, sources
    from psdclip.train import objectives

    assert set(objectives.MODULES) == {f.stem for f in (ROOT / "train" / "objectives").glob("*.py")} - {"__init__"}
    assert {o.loss for o in objectives.registry().values()} == {"clip", "psd", "siglip"}
    for name, (module, ext) in fmt.SHARD_FORMATS.items():
        impl = fmt.shard_format_impl(name)
        assert (impl.name, impl.extension) == (name, ext) and (ROOT / "pipeline" / f"{module}.py").is_file()
    assert {f.stem for f in (ROOT / "pipeline").glob("shard_*.py")} == {m for m, _ in fmt.SHARD_FORMATS.values()}
    for name, (module, description) in sources.MODULES.items():
        src = sources.sources()[name]
        assert src.name == name and src.description == description
        assert (ROOT / "pipeline" / f"{module}.py").is_file()
