"""``make evaluate``: merge the fold OOF files, aggregate, score, plot, and fit the final stacker.

Inputs: ``$WORK/stage2/oof/fold<k>.csv`` (from ``fit``), ``$DATA/train.csv``, ``$WORK/folds.csv``.
Outputs:

* ``$WORK/oof.csv``: wide ``StudyInstanceUID, C1..C7, patient_overall, fold`` by the chosen rule
  (the stacker column is nested: each fold's rows come from a stacker fitted on the other folds);
* ``$WORK/metrics.json``: competition metric (per-study and global forms) of every rule and of the
  constant-prevalence baseline (prevalence of each fold's training folds), AUC per target, and
  the ``operating_points`` that ``cspine validate`` applies unchanged to another site
  (:func:`operating_points`);
* ``$WORK/report/roc.png`` and ``calibration.png``;
* ``$WORK/stage2/stacker.json``: the stacker fitted on all OOF rows (for ``make submit``).

Run: ``python -m stage2_classify.evaluate --work work/demo --data data/synth_demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_path, write_csv, write_json
from common.dataset import RSNADataset
from common.folds import read_folds
from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.layout import WorkLayout
from common.metric import auc_per_target, baseline_prevalence, competition_loss, constant_prediction
from stage2_classify.aggregate import (
    DEFAULT_CLIP,
    DEFAULT_RULE,
    RULES,
    Stacker,
    aggregate,
    clip_probs,
    nested_stacker,
)
from stage2_classify.oof import merge_oof

UID = "StudyInstanceUID"


def rule_predictions(oof: pd.DataFrame, y: pd.DataFrame, clip: tuple[float, float], C: float = 1.0
                     ) -> dict[str, pd.DataFrame]:
    """Wide predictions (TARGETS) of every aggregation rule on the OOF rows (stacker nested)."""
    p7 = oof[list(VERTEBRAE)]
    out = {r: aggregate(p7, r, clip=clip) for r in RULES if r != "stacker"}
    _, stackers = nested_stacker(p7, y, oof["fold"], C=C)
    # each fold's rows through aggregate() with the stacker fitted on the other folds: the same
    # path (overall + C1..C7 calibration) as make submit and cspine predict
    parts = [aggregate(p7.loc[oof["fold"] == k], "stacker", st, clip) for k, st in stackers.items()]
    out["stacker"] = pd.concat(parts).loc[p7.index]
    return out


def fold_baseline(y_all: pd.DataFrame, folds: pd.Series, uids: pd.Index,
                  clip: tuple[float, float]) -> pd.DataFrame:
    """Constant prediction for each OOF study: the prevalence of its training folds."""
    parts = []
    for k in sorted(folds.loc[uids].unique()):
        train = folds.index[(folds != k) & folds.index.isin(y_all.index)]
        prev = baseline_prevalence(y_all.loc[train].reset_index())
        parts.append(constant_prediction(uids[folds.loc[uids] == k], prev))
    return clip_probs(pd.concat(parts).loc[uids], clip)


#: The groups an operating point is chosen for: one threshold for ``patient_overall`` and one
#: for the vertebrae pooled (applied to each of C1..C7). Per-vertebra thresholds are not
#: recorded: the rarer vertebrae have few OOF positives (RSNA C3: 73 of 2,019 studies), so a
#: threshold at 95 % sensitivity would rest on a handful of cases.
THRESHOLD_GROUPS: dict[str, list[str]] = {OVERALL: [OVERALL], "vertebrae": list(VERTEBRAE)}


def operating_points(y: pd.DataFrame, pred: pd.DataFrame) -> dict:
    """Thresholds for sensitivities 0.80 / 0.90 / 0.95 and the Youden point, chosen on the OOF
    rows (:func:`common.stats.choose_thresholds`), per group of :data:`THRESHOLD_GROUPS`.

    Returns:
        ``{"patient_overall": {"sens80": {"threshold", "sensitivity", "specificity"}, ...},
        "vertebrae": {...}, "chosen_on": ...}``; a group with one class only is empty.
    """
    from common.stats import choose_thresholds

    out: dict = {g: choose_thresholds(y[cols].to_numpy(), pred[cols].to_numpy())
                 for g, cols in THRESHOLD_GROUPS.items()}
    out["chosen_on"] = (f"out-of-fold rows of {len(y)} studies (the chosen rule); a case is "
                        f"positive when p >= threshold; 'vertebrae' pools C1..C7")
    return out


def score(y: pd.DataFrame, pred: pd.DataFrame) -> dict[str, float]:
    return {"comp_loss": competition_loss(y, pred, form="study"),
            "comp_loss_global": competition_loss(y, pred, form="global")}


def evaluate(work: Path, data_root: Path, rule: str = DEFAULT_RULE,
             clip: tuple[float, float] = DEFAULT_CLIP, C: float = 1.0) -> dict:
    """Compute and write every output listed in the module docstring; returns the metrics dict."""
    layout = WorkLayout(work)
    oof = merge_oof(layout.oof_dir)
    labels = RSNADataset(data_root).labels.set_index(UID)
    missing = oof.index.difference(labels.index)
    if len(missing):
        raise ValueError(f"OOF studies without train.csv labels: {missing[:5].tolist()}")
    y = labels.loc[oof.index, list(TARGETS)]
    folds = read_folds(layout.folds).set_index(UID)["fold"]
    preds = rule_predictions(oof, labels, clip, C)
    chosen = preds[rule]
    base = fold_baseline(labels[list(TARGETS)], folds, oof.index, clip)
    aucs = auc_per_target(y, chosen)
    per_fold = {int(k): competition_loss(y.loc[oof["fold"] == k], chosen.loc[oof["fold"] == k])
                for k in sorted(oof["fold"].unique())}
    violations = int((chosen[OVERALL] < chosen[list(VERTEBRAE)].max(axis=1) - 0.2).sum())
    metrics = {
        "n_studies": len(oof), "n_folds": int(oof["fold"].nunique()), "rule": rule,
        "clip": list(clip), **score(y, chosen),
        "baseline_prevalence": score(y, base),
        "rules": {r: score(y, p) for r, p in preds.items()},
        "auc": aucs, "comp_loss_per_fold": per_fold,
        "overall_below_max_vertebra": violations,
        "operating_points": operating_points(y, chosen),
    }
    metrics["beats_prior"] = bool(metrics["comp_loss"] < metrics["baseline_prevalence"]["comp_loss"])
    write_csv(layout.oof, chosen.assign(fold=oof["fold"]).reset_index())
    write_json(layout.metrics, metrics)
    Stacker(C=C).fit(oof[list(VERTEBRAE)], labels).save(layout.stacker)
    plot_roc(y, chosen, layout.report / "roc.png")
    plot_calibration(y, chosen, layout.report / "calibration.png")
    print(format_table(metrics))
    if not metrics["beats_prior"]:
        print(f"WARNING: the model (rule {rule}) does not beat the constant prior out of fold "
              f"(loss {metrics['comp_loss']:.4f} vs {metrics['baseline_prevalence']['comp_loss']:.4f})"
              f"; `make submit` refuses unless IF_WORSE=go-on (ship it anyway) or IF_WORSE=prior "
              f"(submit the prior)")
    return metrics


def format_table(m: dict) -> str:
    """The metrics as a printable text table."""
    lines = [f"stage 2 OOF evaluation: {m['n_studies']} studies, {m['n_folds']} folds, "
             f"rule={m['rule']}, clip={m['clip']}",
             f"{'prediction':<28}{'comp_loss':>11}{'global':>10}"]
    rows = [("constant prevalence", m["baseline_prevalence"])]
    rows += [(f"model, overall={r}" + (" *" if r == m["rule"] else ""), s)
             for r, s in m["rules"].items()]
    lines += [f"{name:<28}{s['comp_loss']:>11.4f}{s['comp_loss_global']:>10.4f}" for name, s in rows]
    auc = m["auc"]
    lines.append("AUC  " + "  ".join(f"{'overall' if t == OVERALL else t}={auc[t]:.3f}"
                                     for t in TARGETS))
    lines.append(f"AUC  mean C1-C7={auc['mean_vertebra']:.3f}  pooled C1-C7={auc['pooled_vertebra']:.3f}")
    for group, points in (m.get("operating_points") or {}).items():
        if isinstance(points, dict) and points:
            lines.append(f"thresholds ({group}): " + "  ".join(
                f"{name}={pt['threshold']:.3f} (sens {pt['sensitivity']:.2f}, spec "
                f"{pt['specificity']:.2f})" for name, pt in points.items()))
    return "\n".join(lines)


def plot_roc(y: pd.DataFrame, pred: pd.DataFrame, path: Path) -> None:
    """ROC curve of each target (one axes, 8 curves) → PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for t in TARGETS:
        yt, pt = y[t].to_numpy(), pred[t].to_numpy()
        if np.unique(yt).size < 2:
            continue
        fpr, tpr, _ = roc_curve(yt, pt)
        lw = 2.5 if t == OVERALL else 1.2
        ax.plot(fpr, tpr, lw=lw, label=f"{t} (AUC {roc_auc_score(yt, pt):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Stage 2 OOF ROC")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_calibration(y: pd.DataFrame, pred: pd.DataFrame, path: Path, bins: int = 10) -> None:
    """Reliability diagram: pooled C1..C7 crops and patient_overall → PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    groups = {"C1-C7 pooled": list(VERTEBRAE), "patient_overall": [OVERALL]}
    for name, cols in groups.items():
        yt, pt = y[cols].to_numpy().ravel(), pred[cols].to_numpy().ravel()
        if np.unique(yt).size < 2:
            continue
        frac, mean = calibration_curve(yt, pt, n_bins=bins, strategy="quantile")
        ax.plot(mean, frac, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed fraction", title="Stage 2 OOF calibration")
    ax.legend(loc="upper left")
    _save(fig, path)


def _save(fig: object, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage2_classify.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder ($WORK)")
    parser.add_argument("--data", type=Path, required=True, help="RSNA-layout data folder ($DATA)")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                        help=f"patient_overall rule written to oof.csv (default {DEFAULT_RULE}; "
                             "every rule's score is reported)")
    parser.add_argument("--clip", type=float, nargs=2, default=list(DEFAULT_CLIP),
                        metavar=("LO", "HI"), help="probability clip range (default 0.001 0.999)")
    parser.add_argument("--stacker-C", type=float, default=1.0, help="stacker L2 inverse strength")
    args = parser.parse_args(argv)
    evaluate(args.work, args.data, args.rule, tuple(args.clip), args.stacker_C)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
