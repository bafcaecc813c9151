"""Per-study aggregation: crop probabilities → C1..C7 → ``patient_overall``, then clipping.

Rules for ``patient_overall`` (RSNA_FACTS.md §9.1 item 5):

* ``noisy_or``: ``1 − Π_v (1 − p_v)`` (2nd and 5th place);
* ``max``: ``max_v p_v`` (4th place);
* ``stacker``: a logistic regression on ``[logit noisy-OR, logit max, logit p_C1 … logit p_C7]``
  fitted to minimise the per-study competition loss of the ``patient_overall`` column: each study's
  sample weight is ``w_overall(y) / Σ_j w_j(y)`` (RSNA_FACTS.md §1.2). It is fitted only on
  out-of-fold rows, and for a row of fold k only on OOF rows of the other folds
  (:func:`nested_stacker`), so it never sees the rows it scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from common.atomic import write_json
from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.metric import weight_matrix

UID = "StudyInstanceUID"
Rule = Literal["noisy_or", "max", "stacker"]
RULES: tuple[str, ...] = ("noisy_or", "max", "stacker")
#: The default rule, by measurement on the demo OOF (docs/stage2.md): with the current CPU profile
#: the parameter-free ``max`` scored 0.338 / 0.296 in two 5-fold runs against 0.402 / 0.343 for the
#: nested stacker, whose C1–C7 recalibration and overall fit (80 studies each) added noise.
DEFAULT_RULE = "max"
DEFAULT_CLIP = (1e-3, 1 - 1e-3)


def noisy_or(p: np.ndarray) -> np.ndarray:
    """``1 − Π(1 − p)`` over the last axis; p (N, 7) → (N,)."""
    return 1.0 - np.prod(1.0 - np.asarray(p, float), axis=-1)


def max_rule(p: np.ndarray) -> np.ndarray:
    """``max(p)`` over the last axis; p (N, 7) → (N,)."""
    return np.max(np.asarray(p, float), axis=-1)


def _logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(np.asarray(p, float), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def stack_features(p: np.ndarray) -> np.ndarray:
    """Stacker inputs (N, 9): logit of noisy-OR, of max, and of each of the 7 vertebra probabilities."""
    p = np.asarray(p, float)
    return np.column_stack([_logit(noisy_or(p)), _logit(max_rule(p)), _logit(p)])


def overall_sample_weight(y: np.ndarray) -> np.ndarray:
    """Weight of each study's ``patient_overall`` term in the per-study metric.

    Args:
        y: 0/1 labels (N, 8) in TARGETS order.

    Returns:
        (N,) ``w_overall / Σ_j w_j`` so that a weighted log loss over the overall column equals that
        column's share of the per-study competition loss.
    """
    w = weight_matrix(y, TARGETS)
    return w[:, TARGETS.index(OVERALL)] / w.sum(axis=1)


@dataclass
class Stacker:
    """Logistic-regression stacker for ``patient_overall`` and calibrator for C1..C7.

    ``patient_overall`` = σ(coef · stack_features(p) + intercept). The vertebra columns are
    recalibrated as ``σ(a · logit p_v + b_v)`` (one slope, one intercept per vertebra; ``vcoef`` =
    [a, b_C1 … b_C7]), fitted with each (study, vertebra) term's share of the per-study metric as
    sample weight: a CNN trained to the end of its schedule is over-confident, and the log loss
    punishes that while AUC does not see it.

    Attributes:
        C: inverse L2 regularisation strength (both fits).
        coef: fitted coefficients (9,), intercept: fitted intercept.
        vcoef: vertebra calibration [slope, 7 intercepts]; empty = no calibration (older files).
        fitted_on: the study UIDs it was fitted on (for leakage checks).
    """

    C: float = 1.0
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    vcoef: list[float] = field(default_factory=list)
    fitted_on: list[str] = field(default_factory=list)

    def fit(self, p7: pd.DataFrame, y: pd.DataFrame) -> "Stacker":
        """Fit on OOF vertebra probabilities ``p7`` (uid-indexed, C1..C7) and labels ``y`` (TARGETS)."""
        from sklearn.linear_model import LogisticRegression

        y = y.loc[p7.index, list(TARGETS)].to_numpy(float)
        target = y[:, TARGETS.index(OVERALL)]
        sw = overall_sample_weight(y)
        x = stack_features(p7[list(VERTEBRAE)].to_numpy(float))
        if np.unique(target).size < 2:  # one class only: a constant at the weighted rate
            rate = float(np.clip(np.average(target, weights=sw), 1e-3, 1 - 1e-3))
            self.coef, self.intercept = [0.0] * x.shape[1], float(_logit(rate))
        else:
            lr = LogisticRegression(C=self.C, max_iter=2000)
            lr.fit(x, target, sample_weight=sw / sw.mean())
            self.coef, self.intercept = lr.coef_[0].tolist(), float(lr.intercept_[0])
        self.vcoef = self._fit_vertebrae(p7[list(VERTEBRAE)].to_numpy(float), y)
        self.fitted_on = [str(u) for u in p7.index]
        return self

    def _fit_vertebrae(self, p: np.ndarray, y: np.ndarray) -> list[float]:
        """[slope, 7 intercepts] of the vertebra calibration; identity if one class only."""
        from sklearn.linear_model import LogisticRegression

        w = weight_matrix(y, TARGETS)
        share = w / w.sum(axis=1, keepdims=True)
        cols = [TARGETS.index(v) for v in VERTEBRAE]
        target, sw = y[:, cols].ravel(), share[:, cols].ravel()
        if np.unique(target).size < 2:
            return []
        n = p.shape[0]
        x = np.column_stack([_logit(p).ravel(), np.tile(np.eye(len(VERTEBRAE)), (n, 1))])
        lr = LogisticRegression(C=self.C, max_iter=2000, fit_intercept=False)
        lr.fit(x, target, sample_weight=sw / sw.mean())
        return lr.coef_[0].tolist()

    def calibrate(self, p7: np.ndarray) -> np.ndarray:
        """Calibrated vertebra probabilities (N, 7) from raw ones (N, 7); unchanged without vcoef."""
        p7 = np.asarray(p7, float)
        if not self.vcoef:
            return p7
        z = self.vcoef[0] * _logit(p7) + np.asarray(self.vcoef[1:])[None, :]
        return 1.0 / (1.0 + np.exp(-z))

    def predict(self, p7: np.ndarray) -> np.ndarray:
        """``patient_overall`` probabilities (N,) from vertebra probabilities (N, 7)."""
        if not self.coef:
            raise RuntimeError("Stacker.predict before fit (or an empty stacker file)")
        z = stack_features(p7) @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: str | Path) -> None:
        """Write the fitted stacker as JSON (atomic)."""
        write_json(path, {"C": self.C, "coef": self.coef, "intercept": self.intercept,
                          "vcoef": self.vcoef, "n_fitted": len(self.fitted_on)})

    @classmethod
    def load(cls, path: str | Path) -> "Stacker":
        d = json.loads(Path(path).read_text())
        return cls(C=d["C"], coef=list(d["coef"]), intercept=float(d["intercept"]),
                   vcoef=list(d.get("vcoef", [])))


def nested_stacker(p7: pd.DataFrame, y: pd.DataFrame, folds: pd.Series, C: float = 1.0
                   ) -> tuple[pd.Series, dict[int, Stacker]]:
    """Out-of-fold ``patient_overall`` by stackers that never see the rows they score.

    Args:
        p7: OOF vertebra probabilities, indexed by StudyInstanceUID, columns C1..C7.
        y: labels (TARGETS), indexed by StudyInstanceUID (a superset of p7's index is fine).
        folds: fold of each study in ``p7`` (Series indexed by StudyInstanceUID).
        C: regularisation of each stacker.

    Returns:
        (overall probabilities Series indexed like ``p7``, {fold: the stacker used for that fold}).
    """
    folds = folds.loc[p7.index]
    out = pd.Series(np.nan, index=p7.index, name=OVERALL)
    stackers: dict[int, Stacker] = {}
    for k in sorted(folds.unique()):
        score = folds.index[folds == k]
        fit = folds.index[folds != k]
        if not len(fit):
            raise ValueError("the nested stacker needs OOF rows of at least two folds")
        st = Stacker(C=C).fit(p7.loc[fit], y)
        out.loc[score] = st.predict(p7.loc[score, list(VERTEBRAE)].to_numpy(float))
        stackers[int(k)] = st
    return out, stackers


def overall_by_rule(p7: np.ndarray, rule: Rule, stacker: Stacker | None = None) -> np.ndarray:
    """``patient_overall`` (N,) from vertebra probabilities (N, 7) by a fixed rule or a fitted stacker."""
    if rule == "noisy_or":
        return noisy_or(p7)
    if rule == "max":
        return max_rule(p7)
    if rule == "stacker":
        if stacker is None:
            raise ValueError("rule 'stacker' needs a fitted Stacker (run `make evaluate` first)")
        return stacker.predict(p7)
    raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {RULES}")


def clip_probs(wide: pd.DataFrame, clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """Clip every target column to ``[lo, hi]``."""
    lo, hi = clip
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"clip range must satisfy 0 <= lo < hi <= 1, got {clip}")
    out = wide.copy()
    out[list(TARGETS)] = out[list(TARGETS)].clip(lo, hi)
    return out


def aggregate(p7: pd.DataFrame, rule: Rule = "noisy_or", stacker: Stacker | None = None,
              clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """Wide predictions (TARGETS) from per-study vertebra probabilities.

    Args:
        p7: indexed by StudyInstanceUID, columns C1..C7 (absent vertebrae already hold the prior).
        rule: how ``patient_overall`` is made (``stacker`` also recalibrates C1..C7).
        stacker: the fitted stacker for ``rule="stacker"``.
        clip: final probability range.
    """
    wide = p7[list(VERTEBRAE)].astype(float).copy()
    raw = wide.to_numpy(float)
    wide[OVERALL] = overall_by_rule(raw, rule, stacker)
    if rule == "stacker" and stacker is not None:  # the stacker also recalibrates C1..C7
        wide[list(VERTEBRAE)] = stacker.calibrate(raw)
    return clip_probs(wide[list(TARGETS)], clip)


def crops_to_study(crops: pd.DataFrame, uids: list[str], prior: dict[str, float]) -> pd.DataFrame:
    """Per-study C1..C7 from crop probabilities; vertebrae without a crop get the prior.

    Args:
        crops: rows with ``study_uid``, ``vertebra``, ``prob`` (one per scored crop).
        uids: every study that needs a row (studies with no crop at all get the prior throughout).
        prior: per-target fallback probability.

    Returns:
        DataFrame indexed by StudyInstanceUID (``uids`` order), columns C1..C7.
    """
    wide = crops.pivot_table(index="study_uid", columns="vertebra", values="prob", aggfunc="mean")
    wide = wide.reindex(index=[str(u) for u in uids], columns=list(VERTEBRAE))
    for v in VERTEBRAE:
        wide[v] = wide[v].fillna(prior[v])
    wide.index.name = UID
    wide.columns.name = None
    return wide
