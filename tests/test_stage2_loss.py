"""The training loss is the competition metric: same weights, same normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.labels import TARGETS
from common.metric import WEIGHTS, competition_loss
from stage2_classify.module import metric_weighted_bce


def _frames(y: np.ndarray, p: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    idx = pd.Index([f"u{i}" for i in range(len(y))], name="StudyInstanceUID")
    return pd.DataFrame(y, index=idx, columns=list(TARGETS)), pd.DataFrame(p, index=idx,
                                                                           columns=list(TARGETS))


CASES = [
    # all negative, 0.5 everywhere: ln 2 in both forms (RSNA_FACTS.md §1.4)
    (np.zeros((2, 8)), np.full((2, 8), 0.5)),
    # one positive study (C2 + overall) and one negative, hand-picked probabilities
    (np.array([[0, 1, 0, 0, 0, 0, 0, 1], [0] * 8]),
     np.array([[0.1, 0.8, 0.2, 0.1, 0.1, 0.3, 0.2, 0.9], [0.05, 0.1, 0.2, 0.3, 0.4, 0.2, 0.1, 0.3]])),
    # many positives in one study: the two forms differ
    (np.array([[1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1], [0] * 8]),
     np.array([[0.7, 0.6, 0.4, 0.2, 0.1, 0.5, 0.3, 0.8], [0.2] * 7 + [0.4], [0.3] * 8])),
]


@pytest.mark.parametrize("form", ["study", "global"])
@pytest.mark.parametrize("y,p", CASES)
def test_metric_weighted_bce_equals_competition_loss(y, p, form):
    w_neg = torch.tensor([WEIGHTS[t][0] for t in TARGETS])
    w_pos = torch.tensor([WEIGHTS[t][1] for t in TARGETS])
    logits = torch.logit(torch.tensor(p, dtype=torch.float64))
    ours = metric_weighted_bce(logits, torch.tensor(y, dtype=torch.float64), w_neg, w_pos, form)
    ref = competition_loss(*_frames(y, p), form=form)
    assert float(ours) == pytest.approx(ref, rel=1e-9)


def test_hand_value_of_the_first_nontrivial_case():
    y, p = CASES[1]
    # study 1: weights C1..C7 = 1,2,1,1,1,1,1 and overall 14 → Σw = 22
    l1 = -(np.log(0.9) + 2 * np.log(0.8) + np.log(0.8) + np.log(0.9) + np.log(0.9) + np.log(0.7)
           + np.log(0.8) + 14 * np.log(0.9)) / 22
    l2 = -(np.log(0.95) + np.log(0.9) + np.log(0.8) + np.log(0.7) + np.log(0.6) + np.log(0.8)
           + np.log(0.9) + 7 * np.log(0.7)) / 14
    assert competition_loss(*_frames(y, p)) == pytest.approx((l1 + l2) / 2)


def test_crop_loss_weights_a_positive_twice():
    logits = torch.tensor([[0.0], [0.0]])
    y = torch.tensor([[1.0], [0.0]])
    one = torch.ones(1)
    loss = metric_weighted_bce(logits, y, one, 2 * one)
    assert float(loss) == pytest.approx(np.log(2))  # (2 ln2 + ln2) / 3
    y2 = torch.tensor([[1.0], [0.0]])
    l_pos = metric_weighted_bce(torch.tensor([[-1.0], [0.0]]), y2, one, 2 * one)
    manual = (2 * np.log1p(np.exp(1.0)) + np.log(2)) / 3
    assert float(l_pos) == pytest.approx(manual, rel=1e-6)
