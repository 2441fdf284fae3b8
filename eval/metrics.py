"""Evaluation metrics and the statistics over them: numpy in, numpy out, shapes checked on entry. Each metric
returns per-example values where there are examples, so that `psdclip compare` can bootstrap confidence
intervals over them; the sweep's statistics over runs (Student-t intervals over seeds, the smallest detectable
difference, scaling-law fits) live here too."""
from __future__ import annotations

import warnings

import numpy as np


def _check(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    return a


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """1.0 where the true class is among the k highest logits (ties counted against: a wrong class with an
    equal logit ranks above)."""
    logits, labels = _check("logits", logits, 2), _check("labels", labels, 1)
    if len(logits) != len(labels):
        raise ValueError(f"logits has {len(logits)} rows, labels {len(labels)}")
    true = logits[np.arange(len(labels)), labels][:, None]
    wrong_at_least = (logits >= true).sum(1) - 1  # classes other than the true one scoring >= it
    return (wrong_at_least < k).astype(np.float64)


def retrieval_ranks(sim: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sim: images x captions similarity; caption_image[j] = the image that caption j belongs to.
    Returns (image->text rank per image, text->image rank per caption), 0 = first. An image is retrieved by
    any of its captions (its best-ranked one); each caption has one correct image. Ties count against."""
    sim, caption_image = _check("sim", sim, 2), _check("caption_image", caption_image, 1)
    n_img, n_txt = sim.shape
    if len(caption_image) != n_txt or caption_image.min() < 0 or caption_image.max() >= n_img:
        raise ValueError("caption_image must map each caption (column) to an image (row)")
    own = np.zeros_like(sim, dtype=bool)
    own[caption_image, np.arange(n_txt)] = True
    # text -> image: for caption j, images other than its own with score >= the own image's score
    own_score_t = sim[caption_image, np.arange(n_txt)]
    t2i = ((sim >= own_score_t[None, :]) & ~own).sum(0)
    # image -> text: for image i, the best rank over its captions of wrong captions scoring >= it
    i2t = np.full(n_img, n_txt, dtype=np.int64)
    for j in range(n_txt):
        i = caption_image[j]
        rank = int(((sim[i] >= sim[i, j]) & ~own[i]).sum())
        i2t[i] = min(i2t[i], rank)
    return i2t, t2i


def recall_at(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((np.asarray(ranks) < k).mean()) for k in ks}


def linear_probe(train: tuple, val: tuple, test: tuple, cs=None, max_iter: int = 1000) -> dict:
    """Logistic regression (L-BFGS) on frozen features, as the CLIP paper: the inverse regularisation C is
    chosen on the validation split, then the model is refit on train + validation and scored on test."""
    from sklearn.linear_model import LogisticRegression

    cs = cs if cs is not None else np.logspace(-3, 3, 7)
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear probe: the training split needs at least two classes")
    best_c, best = None, -1.0
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        clf.fit(xtr, ytr)
        acc = float((clf.predict(xva) == yva).mean())
        if acc > best:
            best_c, best = c, acc
    clf = LogisticRegression(C=best_c, max_iter=max_iter)
    clf.fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    correct = (clf.predict(xte) == yte).astype(np.float64)
    return {"accuracy": float(correct.mean()), "C": float(best_c), "val_accuracy": best, "correct": correct}


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def effective_robustness(ref_base, ref_shifted, base: float, shifted: float) -> dict:
    """Taori et al. 2020: fit logit(shifted) = a·logit(base) + b over reference runs; effective robustness
    is the shifted accuracy above the fit's prediction at this run's base accuracy."""
    ref_base, ref_shifted = np.asarray(ref_base, float), np.asarray(ref_shifted, float)
    if len(ref_base) < 2 or len(ref_base) != len(ref_shifted):
        raise ValueError("effective robustness needs at least two reference (base, shifted) points")
    a, b = np.polyfit(_logit(ref_base), _logit(ref_shifted), 1)
    predicted = float(1 / (1 + np.exp(-(a * _logit(base) + b))))
    return {"effective_robustness": float(shifted - predicted), "predicted_shifted": predicted, "slope": float(a),
            "intercept": float(b)}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of b - a over paired test examples, with a percentile bootstrap confidence interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired examples differ in shape: {a.shape} vs {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    diffs = (b[idx] - a[idx]).mean(1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float((b - a).mean()), "ci_low": float(lo), "ci_high": float(hi)}


# ---- over runs: seeds and data sizes -------------------------------------------------------------------

def power_law(n, a, b, c):
    return a * np.power(n, -b) + c


def plateau_law(n, b, log_n0, c, e0):
    """error = c + (e0 − c) / (1 + (N/N0)^b): the random-guess error e0 for N ≪ N0 (Hestness et al. 2017's
    small-data region), a power law a·N^(−b) + c with a = (e0 − c)·N0^b for N ≫ N0."""
    return c + (e0 - c) / (1 + np.power(np.asarray(n, float) / np.exp(log_n0), b))


def _r2(errors, pred) -> float:
    ss_res, ss_tot = float(((errors - pred) ** 2).sum()), float(((errors - errors.mean()) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot else 1.0


def r2_ceiling(ns, errors) -> float:
    """The largest R² any curve in N can reach over these points: the share of their variance that the mean error at
    each N explains (what is left is the spread between seeds at one N, which no law in N removes)."""
    ns, errors = np.asarray(ns, float), np.asarray(errors, float)
    _, group = np.unique(ns, return_inverse=True)
    means = np.bincount(group, errors) / np.bincount(group)
    return _r2(errors, means[group])


def fit_power_law(ns, errors) -> dict:
    """error = a·N^(−b) + c by least squares over the given points (one per run, or one per size); R² of the
    fit over those points."""
    from scipy.optimize import OptimizeWarning, curve_fit

    ns, errors = np.asarray(ns, float), np.asarray(errors, float)
    if len(np.unique(ns)) < 3:
        return {"ok": False, "note": "needs at least three data sizes"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(power_law, ns, errors, p0=(1.0, 0.3, float(errors.min()) * 0.5),
                                     bounds=([0, 0, 0], [np.inf, 3, 1]), maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return {"ok": False, "note": str(err)}
    return {"ok": True, "form": "power", "a": float(a), "b": float(b), "c": float(c),
            "r2": _r2(errors, power_law(ns, a, b, c)), "points": int(len(ns))}


def fit_scaling(ns, errors, guess: float | None = None) -> dict:
    """The declared fit of error against N. Without a random-guess error, the power law (fit_power_law). With
    one (1 − the metric's chance value, declared in the recipe), the power law with a random-guess plateau
    (plateau_law; same number of free parameters: b, N0, c), since with compute proportional to N the smallest
    subsets train too little to leave chance and a plain power law cannot bend to a plateau. Both R² are
    reported (r2 of the declared form, r2_power of the plain power law over the same points), with r2_max, the most
    any curve in N could reach over them (r2_ceiling)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    power = fit_power_law(ns, errors)
    ns, errors = np.asarray(ns, float), np.asarray(errors, float)
    ceiling = r2_ceiling(ns, errors) if len(ns) else float("nan")
    if guess is None or len(np.unique(ns)) < 3:
        return {**power, "r2_max": ceiling}
    e0 = float(guess)
    law = lambda n, b, log_n0, c: plateau_law(n, b, log_n0, c, e0)  # noqa: E731
    p0 = (1.0, float(np.log(np.median(ns))), max(0.0, min(float(errors.min()), e0) * 0.5))
    try:
        with warnings.catch_warnings():  # a covariance that cannot be estimated (few points) does not matter here
            warnings.simplefilter("ignore", OptimizeWarning)
            (b, log_n0, c), _ = curve_fit(law, ns, errors, p0=p0, bounds=([0, 0, 0], [5, 25, max(e0, 1e-9)]),
                                          maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return {"ok": False, "note": str(err), "r2_power": power.get("r2"), "r2_max": ceiling}
    n0 = float(np.exp(log_n0))
    return {"ok": True, "form": "plateau", "e0": e0, "b": float(b), "n0": n0, "c": float(c),
            "a": float((e0 - c) * n0 ** b), "r2": _r2(errors, law(ns, b, log_n0, c)), "r2_power": power.get("r2"),
            "r2_max": ceiling, "points": int(len(ns))}


def predict(fit: dict, ns):
    if fit["form"] == "plateau":
        return plateau_law(ns, fit["b"], np.log(fit["n0"]), fit["c"], fit["e0"])
    return power_law(ns, fit["a"], fit["b"], fit["c"])


def ci_half(values: np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean, Student t (few seeds: t, not 1.96)."""
    from scipy.stats import t

    n = len(values)
    return float(t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def min_detectable(values: np.ndarray, power: float = 0.8) -> float:
    """The smallest true mean difference a paired two-sided t test at 5% detects with the given power, for
    this many pairs and the observed spread of their differences: (t_0.975 + t_power)·sd/√n."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return float("nan")
    return float((t.ppf(0.975, n - 1) + t.ppf(power, n - 1)) * values.std(ddof=1) / np.sqrt(n))


def paired_differences(table, metric: str, base: str = "clip") -> list[dict]:
    """(method − base) per N, paired by seed: mean, 95% Student-t half-width and smallest detectable difference."""
    out = []
    for n, grp in table.groupby("N"):
        if base not in set(grp["method"]) or metric not in grp:
            continue
        b = grp[grp["method"] == base].set_index("seed")[metric]
        for method in [m for m in grp["method"].unique() if m != base]:
            o = grp[grp["method"] == method].set_index("seed")[metric]
            seeds = sorted(set(b.index) & set(o.index))
            d = o.loc[seeds].to_numpy(float) - b.loc[seeds].to_numpy(float)
            out.append({"N": int(n), "method": method, "diff": float(d.mean()), "half": ci_half(d),
                        "detectable": min_detectable(d), "seeds": len(seeds)})
    return out
