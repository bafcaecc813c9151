"""The RSNA 2022 competition metric, per-target AUC and the submission format.

The score is a weighted binary log loss over 8 targets per study (RSNA_FACTS.md §1):

=================  ==================  ==================
column             weight if label 0   weight if label 1
=================  ==================  ==================
C1 … C7            1                   2
patient_overall    7                   14
=================  ==================  ==================

Probabilities are clipped to ``[eps, 1 - eps]`` with ``eps = 1e-15`` (the reference scorer).

* ``form="study"`` (primary, logged as ``val/comp_loss``): each study's loss is
  ``Σ_j w_j l_j / Σ_j w_j`` over its 8 columns; the score is the plain mean over studies.
* ``form="global"`` (``val/comp_loss_global``): ``Σ w l / Σ w`` over all rows of all studies,
  which equals ``sklearn.metrics.log_loss(..., sample_weight=w)``.

"Wide" frames are indexed by ``StudyInstanceUID`` (str) and hold the columns :data:`TARGETS`;
columns are always matched by name, rows by index, never by position. A submission is the long
``row_id,fractured`` format with ``row_id = f"{uid}_{target}"``.
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import pandas as pd

from common.labels import OVERALL, TARGETS, VERTEBRAE

UID = "StudyInstanceUID"
EPS = 1e-15
Form = Literal["study", "global"]

#: (weight if label 0, weight if label 1) per target column.
WEIGHTS: dict[str, tuple[float, float]] = {**{v: (1.0, 2.0) for v in VERTEBRAE}, OVERALL: (7.0, 14.0)}


class MetricInputError(ValueError):
    """Labels or predictions cannot be scored (missing studies/columns, NaN, out of range)."""


# ----------------------------------------------------------------------------- array core
def weight_matrix(y: np.ndarray, columns: Iterable[str] = TARGETS) -> np.ndarray:
    """Per-element competition weights.

    Args:
        y: 0/1 labels, shape (N, K), columns in the order of ``columns``.
        columns: the K target names (keys of :data:`WEIGHTS`).

    Returns:
        float64 array (N, K): ``w_pos`` where y == 1, else ``w_neg`` of that column.
    """
    cols = list(columns)
    neg = np.array([WEIGHTS[c][0] for c in cols], dtype=np.float64)
    pos = np.array([WEIGHTS[c][1] for c in cols], dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.where(y >= 0.5, pos, neg)


def weighted_bce(y: np.ndarray, p: np.ndarray, weights: np.ndarray, eps: float = EPS,
                 form: Form = "study") -> float:
    """Weighted binary cross-entropy, normalised per row ("study") or globally.

    This is the numpy reference that a torch training loss mirrors:
    ``l = -(y ln p + (1-y) ln(1-p))`` with p clipped to [eps, 1-eps]; "study" returns
    ``mean_rows(Σ_k w l / Σ_k w)``, "global" returns ``Σ w l / Σ w``.

    Args:
        y: labels in [0, 1], shape (N, K).
        p: probabilities, shape (N, K).
        weights: per-element weights broadcastable to (N, K), e.g. :func:`weight_matrix`.
        eps: clip bound.
        form: "study" or "global".

    Returns:
        The loss in nats (float).
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), y.shape)
    loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    if form == "study":
        return float(np.mean((w * loss).sum(axis=1) / w.sum(axis=1)))
    if form == "global":
        return float((w * loss).sum() / w.sum())
    raise ValueError(f"form must be 'study' or 'global', got {form!r}")


# ----------------------------------------------------------------------------- DataFrame API
def as_wide(frame: pd.DataFrame, what: str = "frame") -> pd.DataFrame:
    """Return ``frame`` indexed by StudyInstanceUID (str) with exactly the columns TARGETS.

    Accepts the UID either as the index or as a ``StudyInstanceUID`` column (train.csv layout);
    extra columns (e.g. ``fold``) are dropped.

    Raises:
        MetricInputError: missing target columns or duplicate UIDs, naming them.
    """
    if UID in frame.columns:
        frame = frame.set_index(UID)
    missing = [c for c in TARGETS if c not in frame.columns]
    if missing:
        raise MetricInputError(f"{what}: missing target columns {missing}; expected {list(TARGETS)}")
    wide = frame.loc[:, list(TARGETS)].copy()
    wide.index = wide.index.astype(str)
    wide.index.name = UID
    dup = wide.index[wide.index.duplicated()].unique().tolist()
    if dup:
        raise MetricInputError(f"{what}: duplicate StudyInstanceUID rows {dup[:5]}")
    return wide


def _aligned(y_true: pd.DataFrame, y_pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Validate and align labels and predictions; returns (y (N,8), p (N,8), uid index)."""
    yt, yp = as_wide(y_true, "y_true"), as_wide(y_pred, "y_pred")
    missing = yt.index.difference(yp.index)
    extra = yp.index.difference(yt.index)
    if len(missing) or len(extra):
        raise MetricInputError(
            f"studies differ: {len(missing)} labelled studies lack predictions {missing[:5].tolist()}, "
            f"{len(extra)} predicted studies lack labels {extra[:5].tolist()}")
    if len(yt) == 0:
        raise MetricInputError("no studies to score")
    yp = yp.loc[yt.index]
    y = yt.to_numpy(dtype=np.float64)
    p = yp.to_numpy(dtype=np.float64)
    _check_values(yt, y, "y_true", labels=True)
    _check_values(yp, p, "y_pred", labels=False)
    return y, p, yt.index


def _check_values(frame: pd.DataFrame, arr: np.ndarray, what: str, labels: bool) -> None:
    bad = np.isnan(arr) | (arr < 0) | (arr > 1)
    if labels:
        bad |= ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        kind = "0/1 labels" if labels else "probabilities in [0, 1]"
        raise MetricInputError(
            f"{what}: {int(bad.sum())} values are not {kind} (NaN or out of range); first at "
            f"study {frame.index[r]}, column {frame.columns[c]}: {arr[r, c]!r}")


def per_study_loss(y_true: pd.DataFrame, y_pred: pd.DataFrame, eps: float = EPS) -> pd.Series:
    """Weighted log loss of each study (Σ_j w l / Σ_j w over its 8 columns).

    Returns:
        float Series indexed by StudyInstanceUID (the order of ``y_true``), in nats.
    """
    y, p, index = _aligned(y_true, y_pred)
    w = weight_matrix(y)
    pc = np.clip(p, eps, 1.0 - eps)
    loss = -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))
    return pd.Series((w * loss).sum(axis=1) / w.sum(axis=1), index=index, name="loss")


def competition_loss(y_true: pd.DataFrame, y_pred: pd.DataFrame, form: Form = "study",
                     eps: float = EPS) -> float:
    """The competition score (lower is better).

    Args:
        y_true: wide 0/1 labels (index or column ``StudyInstanceUID``; columns TARGETS).
        y_pred: wide probabilities, the same set of studies (any order).
        form: "study" (per-study normalised, then averaged; primary) or "global".
        eps: clip bound for probabilities (the reference uses 1e-15).

    Raises:
        MetricInputError: missing/extra studies, missing columns, NaN or out-of-range values.
    """
    y, p, _ = _aligned(y_true, y_pred)
    return weighted_bce(y, p, weight_matrix(y), eps=eps, form=form)


def auc_per_target(y_true: pd.DataFrame, y_pred: pd.DataFrame) -> dict[str, float]:
    """ROC AUC of each target column, plus two vertebra summaries.

    Returns:
        ``{target: auc}`` for the 8 TARGETS (NaN where the column has a single class), plus
        ``"mean_vertebra"``: the unweighted mean of the C1–C7 AUCs that are defined (NaN if none),
        and ``"pooled_vertebra"``: one AUC over all C1–C7 (study, vertebra) pairs pooled.
    """
    from sklearn.metrics import roc_auc_score

    y, p, _ = _aligned(y_true, y_pred)

    def auc(yy: np.ndarray, pp: np.ndarray) -> float:
        return float(roc_auc_score(yy, pp)) if np.unique(yy).size == 2 else float("nan")

    out = {t: auc(y[:, j], p[:, j]) for j, t in enumerate(TARGETS)}
    vert = [out[v] for v in VERTEBRAE if not np.isnan(out[v])]
    out["mean_vertebra"] = float(np.mean(vert)) if vert else float("nan")
    nv = len(VERTEBRAE)
    out["pooled_vertebra"] = auc(y[:, :nv].ravel(), p[:, :nv].ravel())
    return out


def wide_to_submission(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide probabilities → long submission ``row_id,fractured`` (8 rows per study).

    Rows are ordered study by study (in ``wide``'s order), targets in TARGETS order.
    """
    w = as_wide(wide, "predictions")
    long = w.stack()
    row_id = [f"{uid}_{t}" for uid, t in long.index]
    return pd.DataFrame({"row_id": row_id, "fractured": long.to_numpy(dtype=np.float64)})


def submission_to_wide(sub: pd.DataFrame) -> pd.DataFrame:
    """Long submission → wide frame indexed by StudyInstanceUID with columns TARGETS.

    ``row_id`` is split on the first ``_`` (UIDs hold dots, never underscores).

    Raises:
        MetricInputError: missing columns, malformed/duplicate row_ids, unknown targets, or a study
            lacking some of its 8 rows.
    """
    for col in ("row_id", "fractured"):
        if col not in sub.columns:
            raise MetricInputError(f"submission lacks column {col!r}; expected row_id,fractured")
    parts = sub["row_id"].astype(str).str.split("_", n=1, expand=True)
    if parts.shape[1] < 2 or parts[1].isna().any():
        bad = sub["row_id"][~sub["row_id"].astype(str).str.contains("_")].tolist()
        raise MetricInputError(f"row_id without '_<target>': {bad[:5]}")
    unknown = sorted(set(parts[1]) - set(TARGETS))
    if unknown:
        raise MetricInputError(f"row_id with unknown targets {unknown[:5]}; expected {list(TARGETS)}")
    dup = sub["row_id"][sub["row_id"].duplicated()].tolist()
    if dup:
        raise MetricInputError(f"duplicate row_ids {dup[:5]}")
    long = pd.DataFrame({UID: parts[0].to_numpy(), "target": parts[1].to_numpy(),
                         "fractured": pd.to_numeric(sub["fractured"], errors="coerce").to_numpy()})
    counts = long.groupby(UID)["target"].size()
    incomplete = counts.index[counts < len(TARGETS)]
    if len(incomplete):
        raise MetricInputError(f"{len(incomplete)} studies lack some of their 8 rows: "
                               f"{incomplete[:5].tolist()}")
    wide = long.pivot(index=UID, columns="target", values="fractured")
    wide = wide.reindex(columns=list(TARGETS))
    wide.columns.name = None
    wide.index = wide.index.astype(str)
    return wide


def baseline_prevalence(train_labels: pd.DataFrame) -> dict[str, float]:
    """Mean label of each target column (the constant-prediction prior / failure fallback)."""
    wide = as_wide(train_labels, "train labels")
    return {t: float(wide[t].astype(np.float64).mean()) for t in TARGETS}


def constant_prediction(uids: Iterable[str], values: dict[str, float]) -> pd.DataFrame:
    """A wide prediction frame giving every study in ``uids`` the same per-target values."""
    index = pd.Index([str(u) for u in uids], name=UID)
    return pd.DataFrame({t: float(values[t]) for t in TARGETS}, index=index)
