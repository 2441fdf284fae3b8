"""Evaluation metrics: numpy in, numpy out, shapes checked on entry. Each returns per-example values
where there are examples, so that `psdclip compare` can bootstrap confidence intervals over them."""
from __future__ import annotations

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
