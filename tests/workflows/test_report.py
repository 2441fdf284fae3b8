"""The sweep report's effective-robustness section and its summary at the largest N against values computed by
hand."""
import re

import numpy as np
import pandas as pd
import pytest

from psdclip.core.errors import InputError
from types import SimpleNamespace

from psdclip.workflows.report import rank_readings, robustness_section, summarize, summary_section
from psdclip.workflows.sweep_spec import SweepSpec


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _logit(p):
    return np.log(p / (1 - p))


def test_effective_robustness_against_a_hand_made_trend(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    # CLIP's runs lie on logit(ood) = 0.8 logit(id) - 0.5 exactly; "robust" runs sit 0.05 above it in probability
    for n, base in ((1000, -1.5), (4000, -0.5), (16000, 0.5)):
        for seed in range(3):
            x = _sig(base + 0.2 * rng.standard_normal())
            rows.append({"N": n, "method": "clip", "seed": seed, "id": x, "ood": _sig(0.8 * _logit(x) - 0.5)})
            y = _sig(base + 0.2 * rng.standard_normal())
            rows.append({"N": n, "method": "robust", "seed": seed, "id": y,
                         "ood": _sig(0.8 * _logit(y) - 0.5) + 0.05 + 0.01 * seed})
    table = pd.DataFrame(rows)
    text = robustness_section(table, "id", "ood", str(tmp_path))
    assert "logit(ood) = 0.800 · logit(id) -0.500" in text
    # per cell: clip exactly on its line, robust 0.05 + the seed's 0.01s above it (mean 0.06, interval from 0.01 steps)
    assert re.search(r"\| 4000 \| clip \| [0-9.]+ \| [0-9.]+ \| [+-]0\.0000 ± 0\.0000 \|", text)
    half = 4.302653 * np.std([0.05, 0.06, 0.07], ddof=1) / np.sqrt(3)
    assert "| 4000 | robust | " in text and f"+0.0600 ± {half:.4f} |" in text
    assert f"| 16000 | robust | +0.0600 ± {half:.4f} |" in text  # the paired difference (clip's is 0)
    assert (tmp_path / "robustness_ood.png").stat().st_size > 1000
    # too few clip runs: said, not fitted
    short = robustness_section(table[(table["method"] != "clip") | (table["seed"] == 0) & (table["N"] == 1000)],
                               "id", "ood", str(tmp_path))
    assert "needs at least three clip runs (1 finished)" in short


def test_two_sizes_give_no_fit_table_and_a_bad_robustness_spec_is_refused(tmp_path):
    table = pd.DataFrame([{"N": n, "method": m, "seed": s, "acc": 0.3 + 0.1 * (n > 100) + 0.01 * s}
                          for n in (100, 1000) for m in ("clip", "psd") for s in range(2)])
    text = summarize(table, ["acc"], str(tmp_path))
    assert "No scaling fits: 2 data size(s)" in text and "| method | metric | form |" not in text
    with pytest.raises(InputError, match="sweep.robustness must be"):
        SweepSpec(subsets=["1.0"], methods={"clip": {"loss": "clip"}}, metrics=["a", "b"],
                  robustness={"id": "a", "ood": "c"})


def test_summary_at_the_largest_n_names_methods_by_label_and_bolds_only_what_clears_zero(tmp_path):
    # at N 1000: "up" is clip + 0.02 + 0.002 * seed (interval well clear of zero), "flat" is clip ± 0.01 alternately;
    # the smaller N's runs must not enter the summary
    rows = []
    for s in range(4):
        c = 0.5 + 0.03 * s
        rows += [{"N": 1000, "method": "clip", "seed": s, "acc": c},
                 {"N": 1000, "method": "up", "seed": s, "acc": c + 0.02 + 0.002 * s},
                 {"N": 1000, "method": "flat", "seed": s, "acc": c + (0.01 if s % 2 else -0.01)},
                 {"N": 100, "method": "up", "seed": s, "acc": 0.9}, {"N": 100, "method": "clip", "seed": s, "acc": 0.1}]
    table = pd.DataFrame(rows)
    spec = SweepSpec(subsets=["1.0"], methods={"clip": {}, "flat": {}, "up": {}}, metrics=["acc"],
                     labels={"up": "the one that helps"})
    text = summary_section(table, SimpleNamespace(spec=spec, primary="acc", metrics=["acc"], robustness={}))
    clip = np.array([0.5, 0.53, 0.56, 0.59])
    assert f"largest N, 1,000 pairs), acc: clip {clip.mean():.3f} (SD {clip.std(ddof=1):.3f}, 0.500 to 0.590 over 4" \
        in text
    up = 0.02 + 0.002 * np.arange(4)
    half = 3.182446 * up.std(ddof=1) / 2
    assert f"| `up`: the one that helps | **+{up.mean():.3f} ± {half:.3f}** |" in text
    flat_half = 3.182446 * np.std([-0.01, 0.01, -0.01, 0.01], ddof=1) / 2
    assert f"| `flat` | +0.000 ± {flat_half:.3f} |" in text and "**+0.000" not in text
    assert text.index("`flat`") < text.index("`up`")  # the recipe's order
    assert "effective robustness" not in text
    with pytest.raises(InputError, match=r"sweep.labels .*not methods: nope"):
        SweepSpec(subsets=["1.0"], methods={"clip": {}}, labels={"nope": "x"})


def _study(deltas: dict, n=1000, seeds=3, noise=0.001):
    """A results table at two sizes whose methods lie DELTA (+ a seed's noise) above clip at the largest N and
    reversed at the smaller one (which the rule must not read)."""
    rows = []
    for s in range(seeds):
        rows += [{"N": n, "method": "clip", "seed": s, "m": 0.4 + 0.05 * s},
                 {"N": n // 10, "method": "clip", "seed": s, "m": 0.2}]
        for method, d in deltas.items():
            rows += [{"N": n, "method": method, "seed": s, "m": 0.4 + 0.05 * s + d + noise * (s - 1)},
                     {"N": n // 10, "method": method, "seed": s, "m": 0.2 - d}]
    return pd.DataFrame(rows)


def test_rank_readings_takes_the_best_mean_rank_ties_to_the_first_study_and_says_when_it_is_a_gain():
    a = _study({"t2": 0.01, "rho": -0.01, "bank": 0.0, "oracle": 0.5})
    b = _study({"t2": -0.02, "rho": 0.05, "bank": -0.01})
    cands = ["t2", "rho", "bank"]
    r = rank_readings([("a", a, "m", cands), ("b", b, "m", cands)])
    # ranks a: t2 1, bank 2, rho 3; b: rho 1, bank 2, t2 3 -> all mean 2: the tie goes to a's order
    assert r["ranks"]["a"] == {"t2": 1, "bank": 2, "rho": 3} and r["mean"] == {"t2": 2.0, "bank": 2.0, "rho": 2.0}
    assert r["order"] == ["t2", "bank", "rho"] and r["best"] == "t2"
    assert "oracle" not in r["ranks"]["a"]  # not a candidate
    assert not r["gain"]  # t2 clears zero in a but lies below clip in b
    # t2 first in both, clear of zero in a and above zero in b: a gain
    r = rank_readings([("a", a, "m", cands), ("b", _study({"t2": 0.002, "rho": -0.05, "bank": 0.001}), "m", cands)])
    assert r["best"] == "t2" and r["gain"]
    assert r["deltas"]["a"]["t2"]["diff"] == pytest.approx(0.01) and r["deltas"]["a"]["t2"]["seeds"] == 3
    # above clip in both but within its interval everywhere (a seed's noise as large as the effect): no gain
    noisy = [("a", _study({"t2": 0.002}, noise=0.01), "m", ["t2"]), ("b", _study({"t2": 0.002}, noise=0.01), "m",
                                                                       ["t2"])]
    assert rank_readings(noisy)["best"] == "t2" and not rank_readings(noisy)["gain"]
    with pytest.raises(InputError, match="no candidate reading"):
        rank_readings([("a", a, "m", ["t2"]), ("b", b, "m", ["ema"])])
