"""A sweep's report: results.csv, results.md (means with 95% intervals, scaling fits, each method minus CLIP paired
by seed) and its plots (scaling_*.png, diff_*.png). The statistics are eval/metrics.py's."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.io import write_text
from ..eval.metrics import ci_half, fit_scaling, paired_differences, predict


def write_results(sweep, rows: list[dict], selection: dict | None, pending=(), unfinished=()) -> str:
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(sweep.out, "results.csv"), index=False)
    filtered = "filter" in table and table["filter"].fillna("").astype(bool).any()
    shown = table
    if filtered:  # the filter axis: a filtered run is its own curve, METHOD [FILTER]
        shown = table.copy()
        shown["method"] = [m if not f else f"{m} [{f}]" for m, f in zip(table["method"], table["filter"].fillna(""))]
    report = summarize(shown, sweep.metrics, sweep.out, primary=sweep.primary, chance=sweep.chance)
    if filtered:
        report += "\n\n" + filter_section(table, sweep.primary or sweep.metrics[0], sweep.out)
    robust = getattr(sweep, "robustness", None) or {}
    if robust:
        report += "\n\n" + robustness_section(table, robust["id"], robust["ood"], sweep.out)
    summary = summary_section(table, sweep)
    write_text(os.path.join(sweep.out, "summary.md"), summary + "\n")
    report = summary + "\n\n" + report
    if selection:
        report = selection.get("report", f"Chosen for the scaling stage: {selection['best']} (screen.json)") + "\n\n" + report
    if pending:
        report = (f"**Partial results**: noise level(s) {', '.join(pending)} not run yet; rerun the same command to "
                  f"go on.\n\n" + report)
    if unfinished:
        report = (f"**Partial results** (`psdclip sweep --report`): {len(rows)} run(s) finished, {len(unfinished)} not "
                  f"yet ({', '.join(unfinished[:6])}{', ...' if len(unfinished) > 6 else ''}); rerun the sweep without "
                  f"--report to go on.\n\n" + report)
    write_text(os.path.join(sweep.out, "results.md"), report + "\n")
    return report


def summarize(table: pd.DataFrame, metrics: list[str], out: str, primary: str | None = None,
              chance: dict | None = None) -> str:
    """Per noise level: mean ± 95% CI (Student t) over seeds per (N, method), the scaling fits over the
    individual runs (fit_scaling: with a random-guess plateau for a metric whose chance value is declared), and
    each method minus CLIP on the primary metric; plots beside."""
    chance = chance or {}
    primary = primary or metrics[0]
    levels = [lv for lv in table["noise"].unique()] if "noise" in table else [""]
    sections, diffs = [], {}
    for level in levels:
        t = table[table["noise"] == level] if "noise" in table else table
        head = [f"### Noise level: {level}", ""] if level else []
        lines = head + ["| N | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        fits = {}
        for (n, method), grp in t.groupby(["N", "method"]):
            cells = []
            for m in metrics:
                v = grp[m].dropna().to_numpy() if m in grp else np.array([])
                cells.append(f"{v.mean():.3f} ± {ci_half(v):.3f}" if len(v) else "")
            lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
        if t["N"].nunique() < 3:
            lines += ["", f"No scaling fits: {t['N'].nunique()} data size(s) (a fit needs at least three)."]
        else:
            lines += ["", "Fits of the error (1 − metric) over the individual runs: power law error = a·N^(−b) + c, or, "
                      "for a metric with a declared chance value, the power law with a random-guess plateau e0 = 1 − "
                      "chance: error = c + (e0 − c)/(1 + (N/N0)^b) (≈ a·N^(−b) + c for N ≫ N0). R² (power law) is the "
                      "plain power law's fit over the same points; R² ceiling the most any curve in N can reach over "
                      "them (the share of their variance the per-N means explain: the rest is the spread between "
                      "seeds).", "",
                      "| method | metric | form | a | b | c | N0 | R² | R² (power law) | R² ceiling |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for method, grp in t.groupby("method"):
                for m in metrics:
                    if m not in grp:
                        continue
                    g = grp[["N", m]].dropna()
                    guess = 1 - float(chance[m]) if m in chance else None
                    fit = fit_scaling(g["N"].to_numpy(), 1 - g[m].to_numpy(), guess)
                    fits[(method, m)] = fit
                    if fit["ok"]:
                        n0 = f"{fit['n0']:.0f}" if "n0" in fit else "–"
                        lines.append(f"| {method} | {m} | {fit['form']} | {fit['a']:.3g} | {fit['b']:.3f} | "
                                     f"{fit['c']:.3f} | {n0} | {fit['r2']:.3f} | {fit.get('r2_power', fit['r2']):.3f} | "
                                     f"{fit['r2_max']:.3f} |")
                    else:
                        lines.append(f"| {method} | {m} | – | – | – | – | – | {fit['note']} | – | – |")
        d = paired_differences(t, primary)
        diffs[level] = d
        if d:
            lines += ["", f"Each method minus clip on {primary}, paired by seed (mean ± 95% Student-t interval; "
                      "detectable: the smallest true difference this many seeds detect at 80% power):", "",
                      "| N | method | Δ | detectable | seeds |", "|---|---|---|---|---|"]
            lines += [f"| {r['N']} | {r['method']} | {r['diff']:+.4f} ± {r['half']:.4f} | {r['detectable']:.4f} | "
                      f"{r['seeds']} |" for r in d]
        _plot_fits(t, metrics, fits, out, level)
        sections.append("\n".join(lines))
    if any(diffs.values()):
        _plot_diffs(diffs, primary, out)
    return "\n\n".join(sections)


def filter_section(table: pd.DataFrame, primary: str, out: str) -> str:
    """Each filter minus no filter at the same pool (the size subset it was taken from), per method, paired by
    seed, with diff_filter_*.png beside: the filter axis of DataComp's comparisons."""
    lines = [f"Each filter minus no filter on {primary}, at the same pool (the size subset it filters), paired by "
             "seed (mean ± 95% Student-t interval; detectable at 80% power):", "",
             "| pool N | method | filter | N kept | Δ | detectable | seeds |", "|---|---|---|---|---|---|---|"]
    panels = {}
    t = table[table["pool"].fillna("").astype(bool)] if "pool" in table else table.iloc[:0]
    for (level, method), grp in t.groupby([t["noise"].fillna(""), "method"]):
        frame = grp.assign(N=grp["pool_N"], method=grp["filter"].fillna("").replace("", "none"))
        d = paired_differences(frame, primary, base="none")
        kept = grp.groupby(["pool_N", "filter"])["N"].first().to_dict()
        lines += [f"| {r['N']} | {method} | {r['method']} | {kept.get((r['N'], r['method']), '')} | "
                  f"{r['diff']:+.4f} ± {r['half']:.4f} | {r['detectable']:.4f} | {r['seeds']} |" for r in d]
        if d:
            panels[f"{level} {method}".strip()] = d
    if panels:
        _plot_diffs(panels, primary, out, name="diff_filter", base="no filter", xlabel="pool size N (before the filter)")
    return "\n".join(lines)


def summary_section(table: pd.DataFrame, sweep, base: str = "clip") -> str:
    """The study in one table: at the largest N of each noise level, each method minus the baseline on the primary
    metric (and on effective robustness where the sweep declares it), paired by seed, named by sweep.labels, with
    the baseline's own mean, SD and range. A Δ whose interval excludes zero is bold. Also written as summary.md,
    which README's study blocks are copied from (benchmarks/studies.py)."""
    primary = sweep.primary or sweep.metrics[0]
    spec = getattr(sweep, "spec", None)
    labels = getattr(spec, "labels", None) or {}
    order = list(getattr(sweep, "methods", None) or getattr(spec, "methods", None) or {})
    robust = getattr(sweep, "robustness", None) or {}
    levels = list(table["noise"].unique()) if "noise" in table else [""]
    out = []
    for level in levels:
        t = table[table["noise"] == level] if "noise" in table else table
        if "filter" in t:
            t = t[~t["filter"].fillna("").astype(bool)]
        n = int(t["N"].max())
        top = t[t["N"] == n]
        b = top[top["method"] == base][primary].dropna().to_numpy(float) if primary in top else np.array([])
        where = f"noise level {level}, " if level else ""
        if not len(b):
            out.append(f"Summary ({where}N = {n:,}): no {base} run has finished there yet.")
            continue
        sd = f"SD {b.std(ddof=1):.3f}, " if len(b) > 1 else ""
        head = (f"Summary ({where}the largest N, {n:,} pairs), {primary}: {base} {b.mean():.3f} ({sd}{b.min():.3f} to "
                f"{b.max():.3f} over {len(b)} seed(s)). Each method minus {base}, paired by seed (mean ± 95% "
                f"Student-t interval, bold where it excludes zero; detectable: the smallest true difference this many "
                f"seeds detect at 80% power):")
        d = {r["method"]: r for r in paired_differences(top, primary, base=base)}
        er = {}
        if robust:
            scored, _ = effective_robustness(t, robust["id"], robust["ood"], base)
            if scored is not None:
                er = {r["method"]: r for r in paired_differences(scored[scored["N"] == n], "effective_robustness",
                                                                 base=base)}
        cols = ["method", f"Δ {primary}"] + (["Δ effective robustness"] if er else []) + ["detectable", "seeds"]
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for m in sorted(d, key=lambda m: order.index(m) if m in order else len(order)):
            r = d[m]
            name = f"`{m}`: {labels[m]}" if m in labels else f"`{m}`"
            cells = [name, _delta(r)] + ([_delta(er[m]) if m in er else ""] if er else []) + \
                [f"{r['detectable']:.3f}" if np.isfinite(r["detectable"]) else "–", str(r["seeds"])]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def rank_readings(studies: list, base: str = "clip") -> dict:
    """Pick one reading over several studies: studies is [(name, results table, primary metric, candidate
    methods)]; in each, the candidates present at its largest N are ranked by their difference from `base` on its
    primary metric, paired by seed (1 = best). The best is the lowest mean rank over the studies that all rank it,
    ties to the first study; it is a gain when its interval clears zero in at least one study and its mean
    difference is not below zero in any. Returns best, gain, order (by mean rank), ranks, deltas and mean."""
    ranks, deltas = {}, {}
    for name, table, primary, candidates in studies:
        top = table[table["N"] == table["N"].max()]
        d = {r["method"]: r for r in paired_differences(top, primary, base=base) if r["method"] in candidates}
        deltas[name] = d
        ranks[name] = {m: i + 1 for i, m in enumerate(sorted(d, key=lambda m: -d[m]["diff"]))}
    first = studies[0][0]
    both = [m for m in ranks[first] if all(m in ranks[n] for n in ranks)]
    if not both:
        raise InputError("no candidate reading has finished runs in every study")
    mean = {m: float(np.mean([ranks[n][m] for n in ranks])) for m in both}
    order = sorted(both, key=lambda m: (mean[m], ranks[first][m]))
    best = order[0]
    gain = any(_clear_of_zero(deltas[n][best]) and deltas[n][best]["diff"] > 0 for n in ranks) and \
        all(deltas[n][best]["diff"] >= 0 for n in ranks)
    return {"best": best, "gain": gain, "order": order, "ranks": ranks, "deltas": deltas, "mean": mean}


def _clear_of_zero(r: dict) -> bool:
    """A paired difference whose 95% interval excludes zero (one seed has no interval)."""
    return bool(np.isfinite(r["half"]) and abs(r["diff"]) > r["half"])


def _delta(r: dict) -> str:
    sign = "−" if r["diff"] < 0 else "+"
    text = f"{sign}{abs(r['diff']):.3f}" + (f" ± {r['half']:.3f}" if np.isfinite(r["half"]) else " (one seed)")
    return f"**{text}**" if _clear_of_zero(r) else text


def _logit(p):
    p = np.clip(np.asarray(p, float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def effective_robustness(table: pd.DataFrame, id_metric: str, ood_metric: str, base: str = "clip"):
    """(the runs carrying both metrics with an effective_robustness column, (slope, intercept, trend, base runs)) over
    the baseline's logit-space line; (None, why) when there is no line to draw yet."""
    if id_metric not in table or ood_metric not in table:
        return None, "no runs carry both metrics yet."
    t = table.dropna(subset=[id_metric, ood_metric]).copy()
    b = t[t["method"] == base]
    if len(b) < 3 or b[id_metric].nunique() < 2:
        return None, f"the {base} trend needs at least three {base} runs ({len(b)} finished)."
    slope, icept = np.polyfit(_logit(b[id_metric]), _logit(b[ood_metric]), 1)
    trend = lambda x: 1 / (1 + np.exp(-(slope * _logit(x) + icept)))  # noqa: E731
    t["effective_robustness"] = t[ood_metric].to_numpy(float) - trend(t[id_metric])
    return t, (slope, icept, trend, b)


def robustness_section(table: pd.DataFrame, id_metric: str, ood_metric: str, out: str, base: str = "clip") -> str:
    """Effective robustness (Taori et al. 2020, as CLIP's paper reports it): the baseline's trend of the
    out-of-distribution metric against the in-distribution one, a line in logit space fitted over every baseline
    run (all sizes and seeds); a run's effective robustness is its ood value minus the trend's value at its id value
    (above the line: more robust than the baseline at the same in-distribution accuracy). Per method and N the mean
    with its 95% interval, and method − baseline paired by seed; robustness_*.png draws the runs and the line."""
    head = f"Effective robustness: {ood_metric} against {id_metric}"
    t, fit = effective_robustness(table, id_metric, ood_metric, base)
    if t is None:
        return f"{head}: {fit}"
    slope, icept, trend, b = fit
    lines = [f"{head}. The {base} trend over its {len(b)} runs: logit(ood) = {slope:.3f} · logit(id) {icept:+.3f}; a "
             "run's effective robustness is its ood value minus the trend at its id value (mean ± 95% interval):", "",
             "| N | method | id | ood | effective robustness |", "|---|---|---|---|---|"]
    for (n, method), grp in t.groupby(["N", "method"]):
        er = grp["effective_robustness"].to_numpy()
        lines.append(f"| {n} | {method} | {grp[id_metric].mean():.3f} | {grp[ood_metric].mean():.3f} | "
                     f"{er.mean():+.4f} ± {ci_half(er):.4f} |")
    d = paired_differences(t, "effective_robustness", base=base)
    if d:
        lines += ["", f"Each method's effective robustness minus {base}'s, paired by seed:", "",
                  "| N | method | Δ | detectable | seeds |", "|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['method']} | {r['diff']:+.4f} ± {r['half']:.4f} | {r['detectable']:.4f} | "
                  f"{r['seeds']} |" for r in d]
    _plot_robustness(t, id_metric, ood_metric, trend, out)
    return "\n".join(lines)


def _plot_robustness(t, id_metric, ood_metric, trend, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for method, grp in t.groupby("method"):
        ax.scatter(grp[id_metric], grp[ood_metric], s=16, alpha=0.7, label=method)
    xs = np.linspace(t[id_metric].min(), t[id_metric].max(), 50)
    ax.plot(xs, trend(xs), "k--", lw=1, label="clip trend (logit fit)")
    ax.set_xlabel(f"{id_metric} (in distribution)")
    ax.set_ylabel(f"{ood_metric} (out of distribution)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"robustness_{_slug(ood_metric)}.png"))
    plt.close(fig)


def _slug(text: str) -> str:
    return text.replace(".", "_").replace("@", "").replace(":", "_")


def _plot_fits(table, metrics, fits, out, level=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m in metrics:
        if m not in table:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        one_n = table["N"].nunique() == 1  # one size: each method's runs in a column of their own, named
        methods = list(dict.fromkeys(table["method"]))
        for method, grp in table.groupby("method"):
            if one_n:
                ax.scatter([methods.index(method)] * len(grp), 1 - grp[m], s=14, alpha=0.6, label=f"{method} runs")
                continue
            pts = ax.scatter(grp["N"], 1 - grp[m], s=14, alpha=0.6, label=f"{method} runs")
            fit = fits.get((method, m), {"ok": False})
            if fit["ok"]:
                xs = np.logspace(np.log10(grp["N"].min()), np.log10(grp["N"].max()), 50)
                label = (f"{method}: plateau, N0 {fit['n0']:.0f}, b {fit['b']:.2f}, c {fit['c']:.2f}"
                         if fit["form"] == "plateau" else f"{method}: {fit['a']:.2f}·N^-{fit['b']:.2f}+{fit['c']:.2f}")
                ax.plot(xs, predict(fit, xs), color=pts.get_facecolor()[0][:3], label=f"{label} (R² {fit['r2']:.2f})")
        if one_n:
            _methods_axis(ax, methods, f"training pairs N = {int(table['N'].iloc[0]):,}")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("training pairs N")
        ax.set_ylabel(f"error (1 − {m})")
        ax.set_title(f"noise: {level}" if level else m, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"scaling_{level + '_' if level else ''}{_slug(m)}.png"))
        plt.close(fig)


def _methods_axis(ax, methods: list[str], xlabel: str) -> None:
    """An x axis of method names (a study at one data size: N is no axis there)."""
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_xlabel(xlabel)


def _plot_diffs(diffs: dict, metric: str, out: str, name: str = "diff", base: str = "CLIP",
                xlabel: str = "training pairs N"):
    """method − CLIP against N with 95% intervals, one panel per noise level (or per key of diffs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in diffs if diffs[lv]]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), dpi=100, squeeze=False, sharey=True)
    for ax, level in zip(axes[0], levels):
        d = pd.DataFrame(diffs[level])
        methods = list(d["method"].unique())
        one_n = d["N"].nunique() == 1  # a study at one size: the methods side by side, named on the axis
        for i, (method, grp) in enumerate(d.groupby("method", sort=False)):
            shift = 1 + 0.06 * (i - (len(methods) - 1) / 2)  # side by side on the log axis
            ax.errorbar([i] * len(grp) if one_n else grp["N"] * shift, grp["diff"], yerr=grp["half"].fillna(0),
                        fmt="o" if one_n else "o-", capsize=3, label=method)
        ax.axhline(0, color="k", lw=0.8)
        if one_n:
            _methods_axis(ax, methods, f"{xlabel} = {int(d['N'].iloc[0]):,}")
        else:
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
        ax.set_title((f"noise: {level}" if name == "diff" else level) if level else "", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"Δ {metric} vs {base} (95% CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_{_slug(metric)}.png"))
    plt.close(fig)
