"""psdclip compare: runs side by side (e.g. CLIP vs PSD) on their evaluations: every metric, the
difference to the first run with a bootstrap confidence interval over test examples, effective
robustness against reference runs; a markdown table, JSON and a PNG bar chart."""
from __future__ import annotations

import glob
import os

import numpy as np

from ..core.errors import InputError
from ..core.io import read_json, write_json, write_text
from .config import CompareConfig
from .metrics import bootstrap_diff, effective_robustness

# evaluations written before per-example arrays were named as their metric
_OLD_EXAMPLE_NAMES = {"correct": "accuracy", "i2t_r1": "i2t_R@1", "t2i_r1": "t2i_R@1"}


def load_evals(run: str) -> dict:
    """{suite result name: the evaluation}, per-example arrays under their metric's name."""
    files = sorted(glob.glob(os.path.join(run, "eval", "*.json")))
    if not files:
        raise InputError(f"{run}: no evaluations (run `psdclip eval {run} --suite …` first)")
    evals = {os.path.basename(f)[:-5]: read_json(f) for f in files}
    for result in evals.values():
        examples = result.get("examples") or {}
        for key in list(examples):
            group, name = key.rsplit(".", 1)
            if name in _OLD_EXAMPLE_NAMES:
                examples[f"{group}.{_OLD_EXAMPLE_NAMES[name]}"] = examples.pop(key)
        result["examples"] = examples
    return evals


def compare(cfg: CompareConfig) -> dict:
    evals = {run: load_evals(run) for run in cfg.runs}
    suites = sorted(set.intersection(*(set(e) for e in evals.values())))
    if not suites:
        raise InputError("the runs share no evaluated suite")
    base_run = cfg.runs[0]
    rows = []
    for suite in suites:
        for metric, base_value in evals[base_run][suite]["metrics"].items():
            if not isinstance(base_value, float):
                continue
            row = {"suite": suite, "metric": metric, "values": {}, "diff": {}}
            for run in cfg.runs:
                value = evals[run][suite]["metrics"].get(metric)
                row["values"][run] = value
                if run == base_run or value is None:
                    continue
                a = evals[base_run][suite]["examples"].get(metric)  # the per-example values it is the mean of
                b = evals[run][suite]["examples"].get(metric)
                if a is not None and b is not None and len(a) == len(b):
                    row["diff"][run] = bootstrap_diff(np.array(a), np.array(b), n=cfg.bootstrap)
                else:
                    row["diff"][run] = {"diff": value - base_value}
            rows.append(row)
    robustness = _robustness(cfg, evals, suites)
    out_dir = cfg.out or os.path.join(os.path.dirname(os.path.abspath(base_run)), "compare")
    os.makedirs(out_dir, exist_ok=True)
    result = {"runs": cfg.runs, "rows": rows, "effective_robustness": robustness}
    write_json(os.path.join(out_dir, "compare.json"), result, indent=1)
    md = to_markdown(result)
    write_text(os.path.join(out_dir, "compare.md"), md + "\n")
    _plot(result, os.path.join(out_dir, "compare.png"))
    result["markdown"], result["out"] = md, out_dir
    return result


def _robustness(cfg, evals, suites) -> dict:
    if "synthetic" not in suites:
        return {}
    refs = cfg.reference or [r for r in cfg.runs if evals[r]["synthetic"].get("loss") == "clip"]
    refs = [r for r in refs if r in evals or os.path.isdir(r)]
    ref_evals = {r: (evals.get(r) or load_evals(r))["synthetic"]["metrics"] for r in refs}
    out = {}
    if len(ref_evals) < 2:
        return {"note": "effective robustness needs at least two reference runs (e.g. the CLIP runs of a sweep)"}
    shifts = [k.split(".", 1)[1] for k in evals[cfg.runs[0]]["synthetic"]["metrics"] if k.startswith("robustness.")
              and not k.endswith(".base")]
    for run in cfg.runs:
        m = evals[run]["synthetic"]["metrics"]
        out[run] = {}
        for shift in shifts:
            rb = [ref_evals[r]["robustness.base"] for r in refs]
            rs = [ref_evals[r][f"robustness.{shift}"] for r in refs]
            out[run][shift] = effective_robustness(rb, rs, m["robustness.base"], m[f"robustness.{shift}"])[
                "effective_robustness"]
    return out


def to_markdown(result: dict) -> str:
    runs = result["runs"]
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    head = "| suite | metric | " + " | ".join(names) + " | " + " | ".join(f"{n} − {names[0]} [95% CI]" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(runs) - 1)]
    for row in result["rows"]:
        vals = " | ".join("" if row["values"][r] is None else f"{row['values'][r]:.4f}" for r in runs)
        diffs = []
        for r in runs[1:]:
            d = row["diff"].get(r)
            if d is None:
                diffs.append("")
            elif "ci_low" in d:
                diffs.append(f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
            else:
                diffs.append(f"{d['diff']:+.4f}")
        lines.append(f"| {row['suite']} | {row['metric']} | {vals} | {' | '.join(diffs)} |")
    er = result.get("effective_robustness") or {}
    if er.get("note"):
        lines.append(f"\nEffective robustness: {er['note']}.")
    elif er:
        lines.append("\n| effective robustness | " + " | ".join(next(iter(er.values())).keys()) + " |")
        lines.append("|---|" + "---|" * len(next(iter(er.values()))))
        for run, vals in er.items():
            lines.append(f"| {os.path.basename(os.path.normpath(run))} | " + " | ".join(f"{v:+.4f}" for v in vals.values()) + " |")
    return "\n".join(lines)


def _plot(result: dict, path: str) -> None:
    """Two panels: each run's score per metric, and each run minus the first with the 95% bootstrap interval that
    compare.md prints (a point without an interval where the runs' per-example values were not kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["metric"].endswith(("top1", "accuracy", "R@1"))][:16]
    if not rows:
        return
    runs = result["runs"]
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(rows) * 0.9), 6.5), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        vals = [r["values"][run] or 0 for r in rows]
        top.bar(x + k * width, vals, width, label=names[k])
    top.set_ylabel("score")
    top.legend(fontsize=8)
    step = 0.8 / max(1, len(runs) - 1)
    for k, run in enumerate(runs[1:]):
        d = [r["diff"].get(run) or {} for r in rows]
        mid = np.array([v.get("diff", np.nan) for v in d], dtype=float)
        lo = np.array([v.get("ci_low", v.get("diff", np.nan)) for v in d], dtype=float)
        hi = np.array([v.get("ci_high", v.get("diff", np.nan)) for v in d], dtype=float)
        pos = x + width * (len(runs) - 1) / 2 + (k - (len(runs) - 2) / 2) * step * 0.5
        bottom.errorbar(pos, mid, yerr=[mid - lo, hi - mid], fmt="o", capsize=3, color=f"C{k + 1}",
                        label=f"{names[k + 1]} − {names[0]}")
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("difference [95% CI]")
    bottom.legend(fontsize=8)
    bottom.set_xticks(x + width * (len(runs) - 1) / 2)
    bottom.set_xticklabels([r["metric"].replace("zeroshot_", "zs_") for r in rows], rotation=60, ha="right",
                           fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
