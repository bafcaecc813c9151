"""Validation statistics (common/stats.py) on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common import stats


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        p = np.round(rng.random(40), 1)  # many ties
        if np.unique(y).size < 2:
            continue
        assert stats.rank_auc(y, p)[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(stats.rank_auc(np.ones(5), np.arange(5.0))[0])


def test_separable_scores_give_auc_one_with_a_degenerate_interval():
    y = np.array([0] * 30 + [1] * 30)
    p = np.linspace(0.01, 0.99, 60)  # every positive above every negative
    idx = stats.bootstrap_indices(len(y), 1000, seed=1)
    est = stats.bootstrap_auc(y, p, idx)
    assert est.value == 1.0 and est.low == 1.0 and est.high == 1.0
    assert est.replicates == 1000


def test_random_scores_give_an_interval_covering_one_half():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = rng.random(300)
    est = stats.bootstrap_auc(y, p, stats.bootstrap_indices(300, 1000, seed=4))
    assert est.low < 0.5 < est.high
    assert 0.05 < est.high - est.low < 0.2  # about ±1.96·0.033 for n = 300


def test_bootstrap_is_seeded_and_patient_level_for_pooled_columns():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (50, 7))
    p = np.clip(y * 0.3 + rng.random((50, 7)) * 0.7, 0, 1)
    a = stats.bootstrap_auc(y, p, stats.bootstrap_indices(50, 200, seed=9))
    b = stats.bootstrap_auc(y, p, stats.bootstrap_indices(50, 200, seed=9))
    assert a == b
    assert a.value == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    # a replicate redraws whole studies: with one replicate equal to the identity, the pooled
    # replicate AUC is the point AUC
    ident = np.arange(50)[None]
    assert stats.bootstrap_auc(y, p, ident).low == pytest.approx(a.value)


def test_thresholds_reach_their_sensitivity_and_are_the_largest_that_do():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    points = stats.choose_thresholds(y, p)
    for name, target in stats.SENSITIVITY_TARGETS.items():
        t = points[name]["threshold"]
        sens = (p[y == 1] >= t).mean()
        assert sens >= target and sens == pytest.approx(points[name]["sensitivity"])
        higher = p[p > t].min()  # the next larger threshold misses the target
        assert (p[y == 1] >= higher).mean() < target
    yj = points["youden"]
    j = [(p[y == 1] >= t).mean() - (p[y == 0] >= t).mean() for t in np.unique(p)]
    assert yj["sensitivity"] + yj["specificity"] - 1 == pytest.approx(max(j))
    assert stats.choose_thresholds(np.zeros(5), np.arange(5) / 5) == {}


def test_rates_and_prevalence_adjustment():
    approx = lambda x: pytest.approx(x, abs=1e-6)  # noqa: E731 — values are stored rounded
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([.9, .8, .7, .2, .6, .1, .1, .1, .1, .1])
    out = stats.rates_with_ci(y, p, 0.5, stats.bootstrap_indices(10, 100), prevalence=0.05)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 1, 5, 1)
    assert out["sensitivity"]["value"] == approx(0.75)
    assert out["specificity"]["value"] == approx(5 / 6)
    assert out["ppv"]["value"] == approx(0.75)
    assert out["npv"]["value"] == approx(5 / 6)
    sens, spec, pi = 0.75, 5 / 6, 0.05
    assert out["ppv_at_prevalence"]["value"] == approx(
        sens * pi / (sens * pi + (1 - spec) * (1 - pi)))
    assert out["npv_at_prevalence"]["value"] == approx(
        spec * (1 - pi) / (spec * (1 - pi) + (1 - sens) * pi))
    assert out["ppv_at_prevalence"]["value"] < out["ppv"]["value"]


def test_ece_known_values():
    y = np.array([0, 1, 0, 1])
    assert stats.ece(y, np.full(4, 0.5))[0] == pytest.approx(0.0)
    assert stats.ece(y, np.array([0.0, 1.0, 0.0, 1.0]))[0] == pytest.approx(0.0)
    assert stats.ece(np.ones(4), np.full(4, 0.25))[0] == pytest.approx(0.75)
    est = stats.bootstrap_ece(y, np.full(4, 0.9), stats.bootstrap_indices(4, 200))
    assert est.value == pytest.approx(0.4) and est.low <= 0.4 <= est.high


def test_platt_fits_only_its_rows_and_fixes_a_miscalibration():
    rng = np.random.default_rng(11)
    true = rng.random(2000)
    y = (rng.random(2000) < true).astype(int)
    over = 1 / (1 + np.exp(-3 * np.log(true / (1 - true))))  # over-confident
    fit, rep = stats.split_studies(2000, 0.5, seed=2)
    assert len(np.intersect1d(fit, rep)) == 0 and len(fit) + len(rep) == 2000
    model = stats.Platt.fit(y[fit], over[fit])
    assert model.a == pytest.approx(1 / 3, abs=0.08)
    assert stats.ece(y[rep], model.apply(over[rep]))[0] < stats.ece(y[rep], over[rep])[0]
    with pytest.raises(ValueError, match="positives and negatives"):
        stats.Platt.fit(np.zeros(4), np.full(4, 0.3))


def test_paired_difference_of_identical_runs_is_zero():
    rng = np.random.default_rng(13)
    y = rng.integers(0, 2, 80)
    p = rng.random(80)
    idx = stats.bootstrap_indices(80, 300)
    d = stats.paired_difference(lambda yy, pp: stats.rank_auc(yy, pp), (y, p), (y, p), idx)
    assert d.value == 0 and d.low == 0 and d.high == 0
    better = np.clip(p + 0.5 * y, 0, 1)
    d = stats.paired_difference(lambda yy, pp: stats.rank_auc(yy, pp), (y, better), (y, p), idx)
    assert d.low > 0
