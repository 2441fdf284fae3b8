import numpy as np
import pytest

from psdclip.eval.metrics import (bootstrap_diff, ci_half, effective_robustness, fit_scaling, linear_probe,
                                   min_detectable, plateau_law, predict, r2_ceiling, recall_at, retrieval_ranks,
                                   topk_correct)


def test_topk_with_ties_counted_against():
    logits = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.3]])
    labels = np.array([0, 1, 0])
    assert topk_correct(logits, labels, 1).tolist() == [1.0, 0.0, 0.0]  # row 2: a tie with class 0
    assert topk_correct(logits, labels, 2).tolist() == [1.0, 1.0, 0.0]
    assert topk_correct(logits, labels, 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        topk_correct(logits, labels[:2], 1)


def test_retrieval_ranks_by_hand_with_ties_and_several_captions():
    # 3 images, 5 captions: image 0 has captions 0 and 1, image 1 has 2, image 2 has 3 and 4
    caption_image = np.array([0, 0, 1, 2, 2])
    sim = np.array([
        [0.2, 0.9, 0.5, 0.1, 0.0],   # image 0: caption 1 ranks first -> i2t rank 0
        [0.3, 0.3, 0.3, 0.8, 0.1],   # image 1: its caption 2 ties with captions 0 and 1, 3 is above -> rank 3
        [0.4, 0.1, 0.2, 0.3, 0.35],  # image 2: best own caption (4, 0.35) has caption 0 above -> rank 1
    ])
    i2t, t2i = retrieval_ranks(sim, caption_image)
    assert i2t.tolist() == [0, 3, 1]
    # caption 0 (image 0, 0.2): images 1 (0.3) and 2 (0.4) above -> 2; caption 1: 0; caption 2 (image 1,
    # 0.3): image 0 (0.5) above -> 1; caption 3 (image 2, 0.3): image 1 (0.8) above -> 1; caption 4: 0
    assert t2i.tolist() == [2, 0, 1, 1, 0]
    assert recall_at(i2t, (1, 5)) == {"R@1": 1 / 3, "R@5": 1.0}


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    def split(n):
        y = rng.integers(0, 3, n)
        return centers[y] + rng.normal(size=(n, 8)) * 0.5, y
    res = linear_probe(split(90), split(30), split(60))
    assert res["accuracy"] == 1.0 and len(res["correct"]) == 60
    def noise(n):
        return rng.normal(size=(n, 8)), rng.integers(0, 3, n)

    assert linear_probe(noise(90), noise(30), noise(300))["accuracy"] < 0.6


def test_effective_robustness_on_made_up_points():
    def logit(p):
        return np.log(p / (1 - p))

    def sig(x):
        return 1 / (1 + np.exp(-x))

    base = np.array([0.5, 0.6, 0.7, 0.8])
    shifted = sig(0.8 * logit(base) - 1.0)  # exactly on the line
    on_line = effective_robustness(base, shifted, 0.65, float(sig(0.8 * logit(0.65) - 1.0)))
    assert abs(on_line["effective_robustness"]) < 1e-9 and abs(on_line["slope"] - 0.8) < 1e-9
    above = effective_robustness(base, shifted, 0.65, float(sig(0.8 * logit(0.65) - 1.0)) + 0.05)
    assert abs(above["effective_robustness"] - 0.05) < 1e-9


def test_bootstrap_interval_contains_the_difference():
    a = np.zeros(200)
    b = (np.arange(200) % 4 == 0).astype(float)  # +0.25
    res = bootstrap_diff(a, b)
    assert res["diff"] == 0.25 and res["ci_low"] < 0.25 < res["ci_high"] and res["ci_low"] > 0.15


def test_class_names_pair_by_name_when_they_match_the_folders():
    from psdclip.eval.evaluate import class_names

    folders = ["blue_thing", "green_thing", "red_thing"]
    assert class_names(folders, None, "x")[0] == ["blue thing", "green thing", "red thing"]
    names, how = class_names(folders, ["Red thing", "green_thing", "blue thing"], "x")
    assert names == ["blue thing", "green_thing", "Red thing"] and "by name" in how
    names, how = class_names(folders, ["azure", "emerald", "crimson"], "x")  # other words: sorted-order rule
    assert names == ["azure", "emerald", "crimson"] and "blue_thing -> azure" in how


def test_scaling_fit_with_a_random_guess_plateau():
    """With compute proportional to N the smallest subsets stay at chance: the declared plateau form recovers the
    law that generated such points, where the plain power law (convex in log N) cannot bend to the plateau."""
    rng = np.random.default_rng(0)
    ns = np.repeat([500, 1600, 5000, 16000, 50000], 3)
    e0 = 1 - 1 / 6
    errors = plateau_law(ns, 1.5, np.log(8000), 0.05, e0) + rng.normal(0, 0.01, len(ns))
    fit = fit_scaling(ns, errors, guess=e0)
    assert fit["ok"] and fit["form"] == "plateau" and fit["r2"] > 0.99 and fit["r2_power"] < fit["r2"] - 0.05
    assert abs(fit["b"] - 1.5) < 0.3 and 6000 < fit["n0"] < 10000 and abs(fit["c"] - 0.05) < 0.03
    assert np.allclose(predict(fit, [1e9]), fit["c"], atol=1e-3) and np.allclose(predict(fit, [1]), e0, atol=1e-3)
    assert abs(fit["a"] - (e0 - fit["c"]) * fit["n0"] ** fit["b"]) < 1e-6 * fit["a"]  # the large-N power law
    plain = fit_scaling(ns, 0.5 * ns ** -0.3 + 0.02)  # no chance declared: the plain power law, exact here
    assert plain["form"] == "power" and plain["r2"] > 0.999 and abs(plain["b"] - 0.3) < 0.01
    assert not fit_scaling([1, 2, 1, 2], [0.5, 0.4, 0.5, 0.4], guess=e0)["ok"]  # needs three sizes
    assert fit["r2"] <= fit["r2_max"] + 1e-12 and plain["r2"] <= plain["r2_max"] + 1e-12  # no curve beats the means


def test_r2_ceiling_by_hand():
    """Two seeds at each of three sizes: errors 1,3 | 2,4 | 5,7. The per-N means 2, 3, 6 leave 6 of the total sum
    of squares 23.333 (mean 3.667): ceiling 1 − 6/23.333 = 0.7429; identical seeds reach 1."""
    assert abs(r2_ceiling([1, 1, 2, 2, 3, 3], [1, 3, 2, 4, 5, 7]) - (1 - 6 / (140 / 6))) < 1e-12
    assert r2_ceiling([10, 10, 20, 20, 40], [0.5, 0.5, 0.4, 0.4, 0.1]) == 1.0


def test_seed_statistics_by_hand():
    """Three seeds 1, 2, 3: sd 1, t(0.975, 2) = 4.3027, t(0.8, 2) = 1.0607."""
    v = np.array([1.0, 2.0, 3.0])
    assert abs(ci_half(v) - 4.3027 / np.sqrt(3)) < 1e-3
    assert abs(min_detectable(v) - (4.3027 + 1.0607) / np.sqrt(3)) < 1e-3
    assert np.isnan(ci_half(np.array([0.5]))) and np.isnan(min_detectable(np.array([0.5])))
