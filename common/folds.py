"""Cross-validation folds: stratified by label pattern, one row per study, made once and reused.

Both stages read the same ``$WORK/folds.csv`` (columns ``StudyInstanceUID,fold``), so a study is
in the same validation fold for segmentation crops and for the classifier. A study is one row, so
every split is grouped by study by construction.

Stratification key, per study, the finest level whose group has at least ``n_folds`` members:

1. the 7-bit C1…C7 label pattern (e.g. ``0100001``);
2. the number of fractured vertebrae (capped at 3: ``n0``, ``n1``, ``n2``, ``n3+``);
3. ``patient_overall`` (0/1);
4. one pooled group.

So rare patterns are pooled instead of making ``StratifiedKFold`` fail or warn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import write_csv
from common.labels import OVERALL, VERTEBRAE
from common.tables import read_csv

UID = "StudyInstanceUID"


class FoldsError(ValueError):
    """Folds cannot be made, or the saved folds file does not fit the labels."""


def _labels_frame(labels_df: pd.DataFrame) -> pd.DataFrame:
    frame = labels_df.reset_index() if UID not in labels_df.columns else labels_df
    missing = [c for c in (UID, *VERTEBRAE, OVERALL) if c not in frame.columns]
    if missing:
        raise FoldsError(f"labels lack columns {missing}; expected train.csv layout")
    frame = frame.loc[:, [UID, *VERTEBRAE, OVERALL]].assign(**{UID: frame[UID].astype(str)})
    dup = frame[UID][frame[UID].duplicated()].tolist()
    if dup:
        raise FoldsError(f"labels hold duplicate studies {dup[:5]}; one row per study is required")
    return frame.sort_values(UID, kind="stable").reset_index(drop=True)


def stratification_key(labels_df: pd.DataFrame, n_folds: int = 5) -> pd.Series:
    """The pooled stratification key of each study (see module docstring).

    Returns:
        str Series indexed by StudyInstanceUID, sorted by UID.
    """
    frame = _labels_frame(labels_df)
    vert = frame[list(VERTEBRAE)].astype(int)
    levels = [
        "p" + vert.astype(str).agg("".join, axis=1),
        "n" + vert.sum(axis=1).clip(upper=3).astype(str),
        "o" + frame[OVERALL].astype(int).astype(str),
        pd.Series("all", index=frame.index),
    ]
    key = pd.Series("", index=frame.index, dtype=object)
    todo = np.ones(len(frame), dtype=bool)
    for level in levels:
        cand = level[todo]
        ok = cand.map(cand.value_counts()) >= n_folds
        key[ok.index[ok]] = cand[ok]
        todo[ok.index[ok]] = False
    if todo.any():  # a final pool smaller than n_folds joins the largest group
        assigned = key[~todo]
        key[todo] = assigned.value_counts().idxmax() if len(assigned) else "all"
    key.index = pd.Index(frame[UID], name=UID)
    return key.rename("stratum")


def make_folds(labels_df: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each study to one of ``n_folds`` folds, stratified by label pattern.

    The result depends only on the set of studies, their labels, ``n_folds`` and ``seed`` (not on
    row order).

    Args:
        labels_df: train.csv layout (``StudyInstanceUID`` column or index; C1…C7, patient_overall).
        n_folds: number of folds (≥ 2).
        seed: shuffling seed.

    Returns:
        DataFrame with columns ``StudyInstanceUID`` (str) and ``fold`` (int 0…n_folds-1), sorted by UID.

    Raises:
        FoldsError: fewer studies than folds, n_folds < 2, or malformed labels.
    """
    from sklearn.model_selection import StratifiedKFold

    if n_folds < 2:
        raise FoldsError(f"n_folds must be at least 2, got {n_folds}")
    n = len(_labels_frame(labels_df))
    if n < n_folds:
        raise FoldsError(f"cannot make {n_folds} folds from {n} studies: use fewer folds "
                         f"(at most {n}) or more studies")
    key = stratification_key(labels_df, n_folds)
    fold = np.full(len(key), -1, dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for i, (_, val) in enumerate(splitter.split(np.zeros(len(key)), key.to_numpy())):
        fold[val] = i
    return pd.DataFrame({UID: key.index.to_numpy(), "fold": fold})


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read a folds CSV (``StudyInstanceUID,fold``), validating its columns and values."""
    path = Path(path)
    frame = read_csv(path, dtype={UID: str})
    if list(frame.columns[:2]) != [UID, "fold"]:
        raise FoldsError(f"{path}: expected columns StudyInstanceUID,fold, got {list(frame.columns)}")
    if frame["fold"].isna().any() or (frame["fold"] < 0).any():
        raise FoldsError(f"{path}: fold values must be integers ≥ 0")
    if frame[UID].duplicated().any():
        raise FoldsError(f"{path}: duplicate studies {frame[UID][frame[UID].duplicated()].tolist()[:5]}")
    return frame.assign(fold=frame["fold"].astype(int))


def ensure_folds(labels_df: pd.DataFrame, path: str | os.PathLike, n_folds: int = 5,
                 seed: int = 42) -> pd.DataFrame:
    """Create the folds CSV at ``path`` once (atomically); afterwards always reuse it.

    The saved file wins over ``seed`` (which is not stored); delete the file to re-split. Make it
    from the full train.csv, so that later calls with a subset of studies (e.g. after exclusions)
    still find every study.

    Args:
        labels_df: train.csv layout; every study in it must be in the file.
        path: the folds CSV, conventionally ``$WORK/folds.csv``.
        n_folds: expected number of folds; must match a saved file.
        seed: seed used only when the file is created.

    Returns:
        ``StudyInstanceUID, fold`` rows for the studies of ``labels_df``, in the file's order.

    Raises:
        FoldsError: the saved file lacks studies of ``labels_df`` or has a different fold count.
    """
    path = Path(path)
    if not path.exists():
        write_csv(path, make_folds(labels_df, n_folds=n_folds, seed=seed))
    folds = read_folds(path)
    found = int(folds["fold"].max()) + 1 if len(folds) else 0
    if found != n_folds or folds["fold"].nunique() != n_folds:
        raise FoldsError(f"{path} holds {folds['fold'].nunique()} folds (0…{found - 1}), but "
                         f"n_folds={n_folds} was asked: pass n_folds={found} or delete the file "
                         f"to re-split")
    wanted = set(_labels_frame(labels_df)[UID])
    missing = sorted(wanted - set(folds[UID]))
    if missing:
        raise FoldsError(f"{path} lacks {len(missing)} labelled studies (e.g. {missing[:3]}): it was "
                         f"made from other labels; delete it to re-split, or make it from the full "
                         f"train.csv")
    return folds[folds[UID].isin(wanted)].reset_index(drop=True)


def fold_balance(labels_df: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Per-fold study count and prevalence of each target (a table for logs and tests)."""
    frame = _labels_frame(labels_df).merge(folds, on=UID, how="inner", validate="one_to_one")
    table = frame.groupby("fold")[list(VERTEBRAE) + [OVERALL]].mean()
    table.insert(0, "studies", frame.groupby("fold").size())
    return table
