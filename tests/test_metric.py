"""Competition metric: hand-computed cases, reference values on the real labels, an independent
loop implementation, sklearn agreement, clipping, and the submission round trip."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from common.labels import TARGETS
from common.metric import (
    MetricInputError,
    auc_per_target,
    baseline_prevalence,
    competition_loss,
    constant_prediction,
    per_study_loss,
    submission_to_wide,
    weight_matrix,
    weighted_bce,
    wide_to_submission,
)

UIDS = ["1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.22"]


def _wide(rows: list[list[float]], uids: list[str] = UIDS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(TARGETS),
                        index=pd.Index(uids[: len(rows)], name="StudyInstanceUID"))


def _loop_loss(y: pd.DataFrame, p: pd.DataFrame, form: str, eps: float = 1e-15) -> float:
    """Independent plain-Python implementation of RSNA_FACTS.md §1.2/§1.3."""
    num_total = den_total = 0.0
    study_losses = []
    for uid in y.index:
        num = den = 0.0
        for col in TARGETS:
            label = int(y.loc[uid, col])
            prob = min(max(float(p.loc[uid, col]), eps), 1 - eps)
            base = 7.0 if col == "patient_overall" else 1.0
            w = base * 2 if label == 1 else base
            nll = -math.log(prob) if label == 1 else -math.log(1 - prob)
            num += w * nll
            den += w
        study_losses.append(num / den)
        num_total += num
        den_total += den
    return sum(study_losses) / len(study_losses) if form == "study" else num_total / den_total


def test_single_study_hand_computed():
    # C1 positive (w=2), others negative (w=1), overall positive (w=14); p = 0.8 everywhere.
    y = _wide([[1, 0, 0, 0, 0, 0, 0, 1]])
    p = _wide([[0.8] * 8])
    expected = (2 * -math.log(0.8) + 6 * -math.log(0.2) + 14 * -math.log(0.8)) / (2 + 6 + 14)
    assert competition_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert competition_loss(y, p, form="global") == pytest.approx(expected, rel=1e-12)
    assert per_study_loss(y, p).iloc[0] == pytest.approx(expected, rel=1e-12)


def test_two_studies_forms_differ_as_defined():
    # Study A: all negative, p = 0.1; study B: all positive, p = 0.5.
    y = _wide([[0] * 8, [1] * 8])
    p = _wide([[0.1] * 8, [0.5] * 8])
    la, lb = -math.log(0.9), -math.log(0.5)
    assert competition_loss(y, p, "study") == pytest.approx((la + lb) / 2)
    wa, wb = 7 + 7, 2 * 7 + 14  # total weights: B weighs double
    assert competition_loss(y, p, "global") == pytest.approx((wa * la + wb * lb) / (wa + wb))


def test_columns_by_name_and_rows_by_index():
    rng = np.random.default_rng(1)
    y = _wide(rng.integers(0, 2, (2, 8)).tolist())
    p = _wide(rng.uniform(0.05, 0.95, (2, 8)).tolist())
    shuffled = p.iloc[::-1, ::-1]
    assert competition_loss(y, shuffled) == competition_loss(y, p)
    train_layout = y.reset_index().assign(fold=3)  # UID as a column, extra column ignored
    assert competition_loss(train_layout, p) == competition_loss(y, p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_loop_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = 37
    uids = [f"1.2.826.0.1.3680043.{i}" for i in rng.choice(90000, n, replace=False)]
    y = _wide(rng.integers(0, 2, (n, 8)).tolist(), uids)
    p = _wide(rng.uniform(0, 1, (n, 8)).tolist(), uids)
    p.iloc[0, 0], p.iloc[1, 1] = 0.0, 1.0  # exercise clipping
    for form in ("study", "global"):
        assert competition_loss(y, p, form) == pytest.approx(_loop_loss(y, p, form), rel=1e-10)


def test_global_form_equals_sklearn_log_loss():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(7)
    n = 50
    uids = [f"1.2.826.0.1.3680043.{i}" for i in range(n)]
    y = _wide(rng.integers(0, 2, (n, 8)).tolist(), uids)
    p = _wide(rng.uniform(0.01, 0.99, (n, 8)).tolist(), uids)
    yy, pp = y.to_numpy().ravel(), p.to_numpy().ravel()
    w = weight_matrix(y.to_numpy()).ravel()
    ref = log_loss(yy, pp, sample_weight=w)
    assert competition_loss(y, p, "global") == pytest.approx(ref, rel=1e-10)


def test_clipping_gives_finite_huge_loss():
    y = _wide([[1, 0, 0, 0, 0, 0, 0, 0]])
    p = _wide([[0.0] + [0.0] * 7])  # C1 confidently wrong, the rest exactly right
    loss = per_study_loss(y, p).iloc[0]
    total_w = 2 + 6 + 7
    assert np.isfinite(loss)
    assert loss * total_w == pytest.approx(2 * -math.log(1e-15), rel=1e-6)  # ≈ 34.54 × 2
    assert -math.log(1e-15) == pytest.approx(34.54, abs=0.01)
    # A larger eps bounds the loss further.
    assert competition_loss(y, p, eps=1e-4) < competition_loss(y, p)


def test_weighted_bce_numpy_core():
    y = np.array([[1.0, 0.0]])
    p = np.array([[0.5, 0.25]])
    w = np.array([2.0, 1.0])
    expected = (2 * math.log(2) + -math.log(0.75)) / 3
    assert weighted_bce(y, p, w) == pytest.approx(expected)
    with pytest.raises(ValueError, match="form"):
        weighted_bce(y, p, w, form="mean")


def test_reference_values_on_real_labels(rsna_meta):
    """RSNA_FACTS.md §1.4: constant 0.5 → 0.693; train prevalence → 0.564 (study), 0.613 (global)."""
    labels = pd.read_csv(rsna_meta / "train.csv", dtype={"StudyInstanceUID": str})
    uids = labels["StudyInstanceUID"]
    half = constant_prediction(uids, {t: 0.5 for t in TARGETS})
    assert round(competition_loss(labels, half, "study"), 3) == 0.693
    assert round(competition_loss(labels, half, "global"), 3) == 0.693
    prior = constant_prediction(uids, baseline_prevalence(labels))
    assert round(competition_loss(labels, prior, "study"), 3) == 0.564
    assert round(competition_loss(labels, prior, "global"), 3) == 0.613
    assert baseline_prevalence(labels)["patient_overall"] == pytest.approx(961 / 2019)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.drop(columns="C3"), "missing target columns"),
    (lambda p: p.iloc[:1], "lack predictions"),
    (lambda p: p.assign(C1=[0.2, np.nan]), "NaN or out of range"),
    (lambda p: p.assign(C7=[1.2, 0.1]), "column C7"),
])
def test_bad_predictions_raise_clear_errors(mutate, message):
    y = _wide([[0] * 8, [1] * 8])
    p = _wide([[0.3] * 8, [0.6] * 8])
    with pytest.raises(MetricInputError, match=message):
        competition_loss(y, mutate(p))


def test_non_binary_labels_rejected():
    y = _wide([[0.5] + [0] * 7])
    with pytest.raises(MetricInputError, match="0/1 labels"):
        competition_loss(y, _wide([[0.3] * 8]))


def test_submission_round_trip_and_errors():
    p = _wide([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.9] * 8])
    sub = wide_to_submission(p)
    assert list(sub.columns) == ["row_id", "fractured"] and len(sub) == 16
    assert sub.row_id.iloc[0] == f"{UIDS[0]}_C1"
    assert sub.row_id.iloc[7] == f"{UIDS[0]}_patient_overall"
    back = submission_to_wide(sub.sample(frac=1, random_state=0))
    pd.testing.assert_frame_equal(back.loc[p.index], p, check_names=False)
    with pytest.raises(MetricInputError, match="lack some"):
        submission_to_wide(sub.iloc[1:])
    with pytest.raises(MetricInputError, match="duplicate"):
        submission_to_wide(pd.concat([sub, sub.iloc[:1]]))
    with pytest.raises(MetricInputError, match="unknown targets"):
        submission_to_wide(sub.assign(row_id=sub.row_id.str.replace("_C1", "_T1")))


def test_auc_per_target():
    y = _wide([[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]],
              UIDS + ["1.2.826.0.1.3680043.333"])
    p = y * 0.8 + 0.1
    p.loc[p.index[2], "C1"] = 0.95  # C1: one negative now outranks the positive (0.9)
    auc = auc_per_target(y, p)
    assert auc["C7"] == 1.0 and auc["patient_overall"] == 1.0
    assert auc["C1"] == pytest.approx(0.5)  # pos 0.9 vs negs {0.1, 0.95}: 1 of 2 pairs right
    assert math.isnan(auc["C2"])  # a single class
    assert auc["mean_vertebra"] == pytest.approx((0.5 + 1.0) / 2)
    assert 0.5 < auc["pooled_vertebra"] <= 1.0


# ----------------------------------------------------------------------------- cspine score
def _write_cli_files(tmp_path, rows=None):
    y = _wide([[1, 0, 0, 0, 0, 0, 1, 1], [0] * 8])
    p = _wide(rows or [[0.7, 0.1, 0.1, 0.1, 0.1, 0.2, 0.6, 0.8], [0.2] * 8])
    sol = tmp_path / "solution.csv"
    y.reset_index()[["StudyInstanceUID", "patient_overall", *TARGETS[:-1]]].to_csv(sol, index=False)
    sub = tmp_path / "submission.csv"
    wide_to_submission(p).to_csv(sub, index=False)
    return y, p, sol, sub


def test_cli_score_prints_both_forms_and_auc(tmp_path, capsys):
    from cspine.cli import main

    y, p, sol, sub = _write_cli_files(tmp_path)
    assert main(["score", str(sol), str(sub)]) == 0
    out = capsys.readouterr().out
    assert f"competition_loss (study): {competition_loss(y, p):.4f}" in out
    assert f"competition_loss (global): {competition_loss(y, p, 'global'):.4f}" in out
    assert "C1" in out and "n/a" in out  # C2 has one class → AUC n/a
    assert main(["score", str(sol), str(sub), "--form", "global"]) == 0
    assert "(study)" not in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.iloc[1:], "row_ids missing"),
    (lambda s: pd.concat([s, pd.DataFrame({"row_id": ["1.2.3_C1"], "fractured": [0.5]})]),
     "unexpected row_ids"),
    (lambda s: s.assign(fractured=[1.5] + [0.5] * (len(s) - 1)), "outside \\[0, 1\\]"),
    (lambda s: s.assign(fractured=[None] + [0.5] * (len(s) - 1)), "missing or outside"),
    (lambda s: s.rename(columns={"fractured": "prob"}), "no column 'fractured'"),
])
def test_cli_score_rejects_bad_submissions(tmp_path, capsys, edit, message):
    from cspine.cli import main

    _, _, sol, sub = _write_cli_files(tmp_path)
    edit(pd.read_csv(sub)).to_csv(sub, index=False)
    assert main(["score", str(sol), str(sub)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_score_missing_file(tmp_path, capsys):
    from cspine.cli import main

    assert main(["score", str(tmp_path / "no.csv"), str(tmp_path / "none.csv")]) == 2
    assert "no.csv" in capsys.readouterr().err
