"""The sweep report's effective-robustness section against values computed by hand."""
import re

import numpy as np
import pandas as pd
import pytest

from psdclip.core.errors import InputError
from psdclip.workflows.report import robustness_section, summarize
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
