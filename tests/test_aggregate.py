"""Aggregation rules, the metric-weighted stacker, and the stacker's no-leakage guarantee."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.metric import competition_loss
from stage2_classify.aggregate import (
    Stacker,
    aggregate,
    clip_probs,
    crops_to_study,
    max_rule,
    nested_stacker,
    noisy_or,
    overall_sample_weight,
)

UID = "StudyInstanceUID"


def test_noisy_or_and_max_hand_cases():
    p = np.array([[0.5, 0.5, 0, 0, 0, 0, 0],
                  [0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],
                  [0.0] * 7,
                  [1.0] + [0.0] * 6])
    np.testing.assert_allclose(noisy_or(p), [0.75, 1 - 0.9 * 0.8 * 0.7, 0.0, 1.0])
    np.testing.assert_allclose(max_rule(p), [0.5, 0.3, 0.0, 1.0])


def test_overall_sample_weight_is_the_overall_share_of_the_study_loss():
    y = np.zeros((2, 8))
    y[1, [0, 7]] = 1  # C1 and overall positive
    np.testing.assert_allclose(overall_sample_weight(y), [7 / 14, 14 / (2 + 6 + 14)])


def test_crops_to_study_fills_absent_vertebrae_and_studies_with_the_prior():
    prior = {t: 0.01 * (i + 1) for i, t in enumerate(TARGETS)}
    crops = pd.DataFrame({"study_uid": ["a", "a"], "vertebra": ["C1", "C7"], "prob": [0.9, 0.2]})
    wide = crops_to_study(crops, ["a", "b"], prior)
    assert list(wide.columns) == list(VERTEBRAE) and list(wide.index) == ["a", "b"]
    assert wide.at["a", "C1"] == 0.9 and wide.at["a", "C7"] == 0.2
    assert wide.at["a", "C3"] == prior["C3"]
    assert wide.loc["b"].tolist() == [prior[v] for v in VERTEBRAE]


def test_aggregate_clips_every_column():
    p7 = pd.DataFrame([[1.0] + [0.0] * 6], columns=list(VERTEBRAE), index=["a"])
    wide = aggregate(p7, "max", clip=(0.01, 0.99))
    assert wide.at["a", "C1"] == 0.99 and wide.at["a", "C2"] == 0.01 and wide.at["a", OVERALL] == 0.99
    with pytest.raises(ValueError):
        clip_probs(wide, (0.5, 0.2))


def _random_study_frame(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    uids = [f"s{i}" for i in range(n)]
    y = pd.DataFrame(rng.random((n, 7)) < 0.2, columns=list(VERTEBRAE), index=uids).astype(int)
    y[OVERALL] = y.max(axis=1)
    p7 = pd.DataFrame(np.clip(0.6 * y.to_numpy()[:, :7] + 0.4 * rng.random((n, 7)), 0.01, 0.99),
                      columns=list(VERTEBRAE), index=uids)
    return p7, y


def test_stacker_improves_on_miscalibrated_noisy_or():
    p7, y = _random_study_frame(400, 0)
    p7 = p7 ** 0.3  # heavily over-confident vertebra probabilities: noisy-OR saturates
    st = Stacker(C=10.0).fit(p7, y)
    stacked = p7.assign(**{OVERALL: st.predict(p7.to_numpy())})
    naive = aggregate(p7, "noisy_or", clip=(1e-3, 1 - 1e-3))
    cols = list(TARGETS)
    assert competition_loss(y, clip_probs(stacked[cols])) < competition_loss(y, naive) - 0.05


def test_nested_stacker_never_fits_on_the_rows_it_scores():
    # Labels are pure noise; a stacker that saw its scoring rows would fit them (weak
    # regularisation, few rows), so in-sample loss would be far below the nested loss.
    rng = np.random.default_rng(1)
    n = 30
    uids = [f"s{i}" for i in range(n)]
    p7 = pd.DataFrame(rng.uniform(0.05, 0.95, (n, 7)), columns=list(VERTEBRAE), index=uids)
    y = pd.DataFrame(0, columns=list(TARGETS), index=uids)
    y[OVERALL] = rng.integers(0, 2, n)
    y.loc[y[OVERALL] == 1, "C1"] = 1
    folds = pd.Series(np.arange(n) % 3, index=uids)
    nested, stackers = nested_stacker(p7, y, folds, C=1e4)
    for k, st in stackers.items():
        scored = set(folds.index[folds == k])
        assert scored.isdisjoint(st.fitted_on)
        assert set(st.fitted_on) == set(uids) - scored
    leaky = Stacker(C=1e4).fit(p7, y).predict(p7.to_numpy())

    def overall_loss(p: np.ndarray) -> float:
        t = y[OVERALL].to_numpy()
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))

    assert overall_loss(nested.to_numpy()) > overall_loss(leaky) + 0.1


def test_stacker_roundtrips_through_json(tmp_path):
    p7, y = _random_study_frame(60, 2)
    st = Stacker(C=1.0).fit(p7, y)
    st.save(tmp_path / "stacker.json")
    back = Stacker.load(tmp_path / "stacker.json")
    np.testing.assert_allclose(back.predict(p7.to_numpy()), st.predict(p7.to_numpy()))


def test_stacker_recalibrates_overconfident_vertebrae(tmp_path):
    rng = np.random.default_rng(2)
    n = 600
    uids = [f"s{i}" for i in range(n)]
    q = rng.uniform(0.02, 0.6, (n, 7))  # the true fracture probabilities: calibrated as they are
    y = pd.DataFrame((rng.random((n, 7)) < q).astype(int), columns=list(VERTEBRAE), index=uids)
    y[OVERALL] = y.max(axis=1)
    logit = np.log(q / (1 - q))
    sharp = pd.DataFrame(1 / (1 + np.exp(-4 * logit)), columns=list(VERTEBRAE), index=uids)
    # the same ranking, four times too confident
    st = Stacker(C=10.0).fit(sharp, y)
    assert len(st.vcoef) == 8 and 0.1 < st.vcoef[0] < 0.45  # the slope undoes the ×4 (ideal 0.25)
    calibrated = st.calibrate(sharp.to_numpy())
    order = np.argsort(sharp.to_numpy()[:, 0])
    assert np.all(np.diff(calibrated[order, 0]) >= 0)  # monotone: the ranking (AUC) is kept
    stacked = aggregate(sharp, "stacker", stacker=st)
    raw = aggregate(sharp, "noisy_or").assign(**{OVERALL: stacked[OVERALL]})
    assert competition_loss(y, stacked) < competition_loss(y, raw) - 0.05
    st.save(tmp_path / "stacker.json")
    again = Stacker.load(tmp_path / "stacker.json")
    np.testing.assert_allclose(again.calibrate(sharp.to_numpy()), calibrated)
    np.testing.assert_array_equal(Stacker(coef=[0.0] * 9).calibrate(sharp.to_numpy()),
                                  sharp.to_numpy())  # files without vcoef: identity
