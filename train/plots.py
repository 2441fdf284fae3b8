"""PNG plots of a run: loss, alpha, learning rate, logit scale, throughput."""
from __future__ import annotations

import json
import os


EVAL_CURVES = ("zeroshot_shape_base.top1", "zeroshot.top1", "retrieval.mean_R@1", "retrieval.t2i_R@1",
               "linear_probe_shape.accuracy", "linear_probe.accuracy")


def plot_run(run_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:  # drawn while training appends: a line still being written is left for the next time
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    if not rows:
        return []
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, title in (("loss", "training loss"), ("alpha", "PSD alpha"), ("lr", "learning rate"),
                       ("logit_scale", "logit scale"), ("samples_per_s", "samples / s")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = os.path.join(out_dir, f"{key}.png")
        fig.savefig(name)
        plt.close(fig)
        written.append(name)
    evals = [r for r in rows if isinstance(r.get("metrics"), dict)]  # --eval-every rows
    shown = [k for k in EVAL_CURVES if any(k in r["metrics"] for r in evals)]
    if shown:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in shown:
            pts = [(r["step"], r["metrics"][key]) for r in evals if key in r["metrics"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1.5, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"evaluation during training: {evals[-1]['eval']} ({evals[-1].get('split', 'all')})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = os.path.join(out_dir, "eval.png")
        fig.savefig(name)
        plt.close(fig)
        written.append(name)
    return written
