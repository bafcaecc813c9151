"""Validation statistics: bootstrap confidence intervals, operating points, calibration.

Where the numbers come from:

* **AUC and ROC**: point estimates and ROC curves from scikit-learn (``roc_auc_score``,
  ``roc_curve``); the bootstrap replicates use the rank (Mann–Whitney) form of the AUC computed
  with ``scipy.stats.rankdata`` over all replicates at once, which equals ``roc_auc_score``
  exactly, ties counted one half (``tests/test_stats.py`` checks the two agree).
* **Bootstrap**: patient-level — each replicate redraws *studies* with replacement (numpy
  ``Generator.integers``, seeded), and every statistic of a replicate (per-vertebra AUC, pooled
  AUC, the competition metric, sensitivities …) is computed on the same redrawn studies, so the
  vertebrae of one study stay together. The interval is the percentile interval
  (``numpy.percentile``) of the replicates where the statistic is defined (a replicate without
  a positive or without a negative has no AUC; how many were usable is reported).
* **Calibration**: the reliability curve from ``sklearn.calibration.calibration_curve``
  (uniform bins); the expected calibration error is ``Σ_b (n_b / N) |mean p_b − fraction_b|``
  over the same ten equal-width bins (numpy; scikit-learn has no ECE).
* **Recalibration**: Platt scaling, ``sklearn.linear_model.LogisticRegression`` on
  ``logit(p)``.

Arrays: ``y`` is int/float 0/1 of shape (N,) or (N, K) (rows = studies), ``p`` float in [0, 1]
of the same shape. Thresholds are probabilities; a case is called positive when ``p >= t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Target sensitivities of the recorded operating points, and their names.
SENSITIVITY_TARGETS: dict[str, float] = {"sens80": 0.80, "sens90": 0.90, "sens95": 0.95}
OPERATING_POINTS = (*SENSITIVITY_TARGETS, "youden")
DEFAULT_REPLICATES = 1000
DEFAULT_SEED = 20240


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED
                      ) -> np.ndarray:
    """Study indices of each bootstrap replicate.

    Returns:
        int64 array (replicates, n): row b lists the n studies (drawn with replacement) of
        replicate b.
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one study")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(replicates, n), dtype=np.int64)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """(low, high, number of finite replicates) of the percentile interval; NaN when none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    a = 100 * (1 - level) / 2
    lo, hi = np.percentile(v, [a, 100 - a])
    return float(lo), float(hi), int(v.size)


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval.

    Attributes:
        value: the estimate on all studies (NaN when undefined).
        low, high: 95 % percentile interval (NaN when no replicate defines it).
        replicates: replicates that define the statistic (of those drawn).
    """

    value: float
    low: float
    high: float
    replicates: int

    def to_json(self) -> dict[str, float | int | None]:
        def f(x: float) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 6)

        return {"value": f(self.value), "ci_low": f(self.low), "ci_high": f(self.high),
                "replicates": int(self.replicates)}


def estimate(value: float, replicates: np.ndarray, level: float = 0.95) -> Estimate:
    lo, hi, n = percentile_ci(replicates, level)
    return Estimate(float(value), lo, hi, n)


# ----------------------------------------------------------------------------- AUC
def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when ``y`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def rank_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUC of each row of (B, M) label/score arrays by the Mann–Whitney rank formula.

    ``AUC = (Σ ranks of positives − n1 (n1 + 1) / 2) / (n1 n0)`` with average ranks for ties,
    which equals scikit-learn's ``roc_auc_score``. Rows without both classes give NaN.

    Returns:
        float64 (B,).
    """
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[None], p[None]
    ranks = rankdata(p, axis=1)
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * y).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    out[(n1 == 0) | (n0 == 0)] = np.nan
    return out


def bootstrap_auc(y: np.ndarray, p: np.ndarray, idx: np.ndarray, level: float = 0.95
                  ) -> Estimate:
    """AUC with its patient-level bootstrap interval.

    Args:
        y, p: (N,) per study, or (N, K) per study and K pooled columns (e.g. C1..C7): a replicate
            takes whole studies, all K columns of each.
        idx: (B, N) replicate study indices (:func:`bootstrap_indices`).
    """
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    point = auc(y, p)
    yb, pb = y[idx], p[idx]  # (B, N) or (B, N, K)
    reps = rank_auc(yb.reshape(len(idx), -1), pb.reshape(len(idx), -1))
    return estimate(point, reps, level)


def bootstrap_mean(values: np.ndarray, idx: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of a per-study quantity (e.g. the per-study competition loss) with its interval."""
    v = np.asarray(values, dtype=np.float64)
    return estimate(float(v.mean()), v[idx].mean(axis=1), level)


def paired_difference(stat: Callable[[np.ndarray], np.ndarray], a: tuple, b: tuple,
                      idx: np.ndarray, level: float = 0.95) -> Estimate:
    """Paired bootstrap of ``stat(A) − stat(B)``: both runs scored on the same redrawn studies.

    Args:
        stat: maps a tuple of arrays indexed by a (B, N) index array (or the identity (1, N))
            to the statistic per replicate, shape (B,).
        a, b: the per-study arrays of run A and run B (same studies, same order).
        idx: (B, N) replicate study indices.
    """
    full = np.arange(len(a[0]))[None]
    point = float(stat(*[x[full] for x in a])[0] - stat(*[x[full] for x in b])[0])
    reps = stat(*[x[idx] for x in a]) - stat(*[x[idx] for x in b])
    return estimate(point, reps, level)


# ----------------------------------------------------------------------------- operating points
def choose_thresholds(y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
    """Operating points picked on (out-of-fold) rows: the thresholds for target sensitivities
    0.80 / 0.90 / 0.95 and the Youden point.

    For a target sensitivity s the threshold is the **largest** t whose sensitivity
    (share of positives with ``p >= t``) is at least s; the Youden point maximises
    sensitivity + specificity − 1 (the largest such t on ties). Computed from
    ``sklearn.metrics.roc_curve(drop_intermediate=False)``.

    Args:
        y, p: (N,) or (N, K) labels and probabilities (flattened: K pooled columns).

    Returns:
        ``{name: {"threshold", "sensitivity", "specificity"}}`` as measured on these rows;
        empty when ``y`` has a single class.
    """
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if np.unique(y).size < 2:
        return {}
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # the first threshold is +inf (nothing called positive)
    out = {}
    for name, target in SENSITIVITY_TARGETS.items():
        i = int(np.argmax(tpr >= target - 1e-12))
        out[name] = {"threshold": float(thr[i]), "sensitivity": float(tpr[i]),
                     "specificity": float(1 - fpr[i])}
    j = tpr - fpr
    i = int(np.flatnonzero(j == j.max())[0])
    out["youden"] = {"threshold": float(thr[i]), "sensitivity": float(tpr[i]),
                     "specificity": float(1 - fpr[i])}
    return out


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
    """(tp, fp, tn, fn) counts of each replicate row; ``y``, ``p`` of shape (B, M) or (M,).

    Returns:
        float64 (B, 4) (B = 1 for 1-D input).
    """
    y = np.asarray(y, dtype=bool)
    call = np.asarray(p, dtype=np.float64) >= threshold
    if y.ndim == 1:
        y, call = y[None], call[None]
    tp = (call & y).sum(axis=1)
    fp = (call & ~y).sum(axis=1)
    tn = (~call & ~y).sum(axis=1)
    fn = (~call & y).sum(axis=1)
    return np.stack([tp, fp, tn, fn], axis=1).astype(np.float64)


def rates(counts: np.ndarray, prevalence: float | None = None) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV from (B, 4) (tp, fp, tn, fn) counts.

    With ``prevalence`` π, also ``ppv_at_prevalence`` and ``npv_at_prevalence`` recomputed by
    Bayes' rule from sensitivity and specificity:
    PPV = sens·π / (sens·π + (1 − spec)(1 − π)), NPV = spec(1 − π) / (spec(1 − π) + (1 − sens)π).
    Undefined ratios are NaN.
    """
    tp, fp, tn, fn = counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        out = {"sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp),
               "npv": tn / (tn + fn)}
        if prevalence is not None:
            pi = float(prevalence)
            out["ppv_at_prevalence"] = sens * pi / (sens * pi + (1 - spec) * (1 - pi))
            out["npv_at_prevalence"] = spec * (1 - pi) / (spec * (1 - pi) + (1 - sens) * pi)
    return out


def rates_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, idx: np.ndarray,
                  prevalence: float | None = None, level: float = 0.95) -> dict:
    """Counts and :func:`rates` at ``threshold`` with patient-level bootstrap intervals.

    Args:
        y, p: (N,) or (N, K) (K pooled columns per study).
        idx: (B, N) replicate study indices.

    Returns:
        ``{"threshold", "tp", "fp", "tn", "fn", "sensitivity": Estimate-json, ...}``.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    point = confusion(y.ravel(), p.ravel(), threshold)
    reps = confusion(y[idx].reshape(len(idx), -1), p[idx].reshape(len(idx), -1), threshold)
    r0, rb = rates(point, prevalence), rates(reps, prevalence)
    out: dict = {"threshold": float(threshold),
                 **{k: int(v) for k, v in zip(("tp", "fp", "tn", "fn"), point[0])}}
    for name in r0:
        out[name] = estimate(float(r0[name][0]), rb[name], level).to_json()
    return out


# ----------------------------------------------------------------------------- calibration
def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> np.ndarray:
    """Expected calibration error of each row of (B, M) arrays (or of one (M,) array).

    Ten equal-width bins on [0, 1] (the last one closed): ``Σ_b (n_b / M) |mean p_b − mean y_b|``.

    Returns:
        float64 (B,).
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[None], p[None]
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = np.zeros(len(y))
    for k in range(bins):
        sel = b == k
        n = sel.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs(np.where(sel, p, 0).sum(axis=1) - np.where(sel, y, 0).sum(axis=1))
        total += np.where(n > 0, gap, 0.0)
    return total / y.shape[1]


def bootstrap_ece(y: np.ndarray, p: np.ndarray, idx: np.ndarray, bins: int = 10,
                  level: float = 0.95) -> Estimate:
    """ECE with its patient-level interval; (N,) or (N, K) inputs as :func:`bootstrap_auc`."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    point = float(ece(y.ravel(), p.ravel(), bins)[0])
    reps = ece(y[idx].reshape(len(idx), -1), p[idx].reshape(len(idx), -1), bins)
    return estimate(point, reps, level)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted probability, observed fraction) per non-empty uniform bin (scikit-learn)."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(y).ravel()
    if np.unique(y).size < 2:  # scikit-learn needs both classes to know the positive label
        empty = np.zeros(0)
        return empty, empty
    frac, mean = calibration_curve(y, np.asarray(p).ravel(), n_bins=bins, strategy="uniform")
    return mean, frac


# ----------------------------------------------------------------------------- recalibration
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Platt:
    """Platt scaling ``p' = sigmoid(a · logit(p) + b)`` fitted on some studies' rows."""

    a: float
    b: float

    @classmethod
    def fit(cls, y: np.ndarray, p: np.ndarray) -> "Platt":
        """Fit on (M,) labels and probabilities (scikit-learn logistic regression, no
        effective penalty).

        Raises:
            ValueError: a single class among the rows.
        """
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y).ravel()
        if np.unique(y).size < 2:
            raise ValueError("recalibration needs positives and negatives among its fitting rows")
        lr = LogisticRegression(C=1e12, solver="lbfgs", max_iter=1000)  # ~no penalty
        lr.fit(_logit(p).reshape(-1, 1), y)
        return cls(float(lr.coef_[0, 0]), float(lr.intercept_[0]))

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Recalibrated probabilities, same shape as ``p``."""
        from scipy.special import expit  # no overflow for large |a · logit p|

        return expit(self.a * _logit(p) + self.b)


def split_studies(n: int, share: float, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of n studies: (fit indices, report indices), disjoint, sorted.

    ``share`` of the studies (rounded, at least one, at most n − 1) go to fitting.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"recalibration share {share} must lie strictly between 0 and 1")
    if n < 2:
        raise ValueError("recalibration needs at least two studies")
    k = int(min(max(round(share * n), 1), n - 1))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:k]), np.sort(order[k:])
