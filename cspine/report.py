"""``cspine report WORK``: one self-contained HTML page about a pipeline run.

Sections (each from the run's own records; a missing record gives a "not available" note naming
the file and the make target that writes it):

1. data census: ``WORK/qc_data.csv`` (``make check-data``);
2. stage 1: validation Dice per vertebra (``WORK/stage1/run.json``), the Dice of the engine's
   labels against the aligned ground truth of the validation-fold studies (scored by
   ``make crops``: ``WORK/stage1/crops/qc_crops.csv``), and example sagittal overlays
   (``WORK/stage1/masks`` over ``WORK/stage1/cache``);
3. stage 2: the metric table against the constant-prevalence baseline, AUC per target, the
   operating points, per-fold losses (``WORK/metrics.json``), ROC and calibration plots
   (``WORK/report/{roc,calibration}.png``, ``make evaluate``);
4. QC: failed studies and the slowest studies of every step (``qc_prepare.csv``,
   ``qc_crops.csv``, the crop manifest, ``submit_qc.csv``).

Output: ``WORK/report/index.html`` with every image embedded (base64), and the PNGs it made
beside it (``dice.png``, ``overlays.png``).
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from common.labels import TARGETS, VERTEBRAE
from common.layout import WorkLayout
from cspine.summary import outputs, stage1_dice, stage2_metrics, wandb_runs

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1b1f24;line-height:1.4}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #d0d7de;
padding-bottom:4px;margin-top:32px}h3{font-size:15px;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
.note{color:#57606a;font-size:13px}.missing{color:#9a6700;background:#fff8c5;padding:6px 10px;
border-radius:6px;font-size:13px}.good{color:#1a7f37;font-weight:600}.bad{color:#cf222e;
font-weight:600}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
img{max-width:100%;border:1px solid #d0d7de;border-radius:4px}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
"""


# ---------------------------------------------------------------------------- small HTML helpers
def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, nd: int = 4) -> str:
    if isinstance(x, (float, np.floating)):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return _esc(x)


def table(rows: Iterable[Iterable[Any]], header: Iterable[str], nd: int = 4) -> str:
    """An HTML table; floats formatted with ``nd`` decimals."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c, nd)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def frame_table(frame: pd.DataFrame, nd: int = 3, limit: int = 15) -> str:
    """An HTML table of the first ``limit`` rows of a DataFrame."""
    return table(frame.head(limit).itertuples(index=False), frame.columns, nd)


def img_tag(path: Path, alt: str, width: int | None = None) -> str:
    """``<img>`` with the PNG embedded as base64 (the page stays self-contained)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img alt="{_esc(alt)}"{w} src="data:image/png;base64,{data}">'


def missing(what: str, path: Path, target: str) -> str:
    return (f'<p class="missing">{_esc(what)}: not available (<code>{_esc(path)}</code> '
            f'missing; run <code>make {_esc(target)}</code>).</p>')


def _csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"study": str,
                           "study_uid": str, "StudyInstanceUID": str})
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


# ---------------------------------------------------------------------------- sections
def census_section(work: Path) -> str:
    """Data census from ``qc_data.csv`` (check-data): studies per split × status, geometry."""
    path = WorkLayout(work).qc_data
    qc = _csv(path)
    out = ["<h2>1. Data census</h2>"]
    if qc is None or qc.empty:
        return "".join(out) + missing("data census", path, "check-data")
    counts = pd.crosstab(qc["split"], qc["status"], margins=True, margins_name="all")
    out.append(table(([i, *r] for i, r in zip(counts.index, counts.to_numpy().tolist())),
                     ["split", *counts.columns]))
    stats = []
    for col, label in (("n_slices", "slices per study"), ("step_mm", "slice step (mm)"),
                       ("rows", "rows (pixels)")):
        if col in qc:
            v = pd.to_numeric(qc[col], errors="coerce").dropna()
            if len(v):
                stats.append((label, float(v.min()), float(v.median()), float(v.max())))
    if stats:
        out.append(table(stats, ["", "min", "median", "max"], 2))
    if "transfer_syntaxes" in qc:
        ts: dict[str, int] = {}
        for cell in qc["transfer_syntaxes"].dropna().astype(str):
            for part in cell.split(";"):
                name, _, n = part.rpartition(":")
                if name:
                    ts[name] = ts.get(name, 0) + int(n or 0)
        out.append("<p class='note'>transfer syntaxes (files): "
                   + ", ".join(f"{_esc(k)} {v}" for k, v in sorted(ts.items())) + "</p>")
    bad = qc[qc["status"].astype(str) != "ok"]
    if len(bad):
        cols = [c for c in ("split", "study", "status", "reasons", "warnings", "repairs")
                if c in bad]
        out.append(f"<h3>Studies not ok ({len(bad)})</h3>" + frame_table(bad[cols], limit=20))
    return "".join(out)


def recomputed_dice(work: Path, fold: int | None, limit: int = 200
                    ) -> tuple[pd.DataFrame, list[str]]:
    """Dice per vertebra of the engine's cleaned labels vs the cached ground truth.

    ``make crops`` scores every segmented train study on the model grid as it runs the engine
    (``WORK/stage1/crops/qc_crops.csv`` → ``dice_C1`` … ``dice_C7``); this keeps the
    validation-fold studies (``WORK/folds.csv`` == ``fold``).

    Returns:
        (one row per study: study_uid + C1..C7 Dice, NaN when that vertebra is absent from the
        ground truth; the UIDs in the order used).
    """
    qc = _csv(WorkLayout(work).qc_crops)
    folds = _csv(WorkLayout(work).folds)
    columns = [f"dice_{v}" for v in VERTEBRAE]
    if qc is None or folds is None or not set(columns) & set(qc.columns):
        return pd.DataFrame(columns=["study_uid", *VERTEBRAE]), []
    uids = folds["StudyInstanceUID"].astype(str)
    if fold is not None:
        uids = uids[folds["fold"] == int(fold)]
    qc = qc[qc["study_uid"].astype(str).isin(set(uids))].head(limit)
    frame = pd.DataFrame({"study_uid": qc["study_uid"].astype(str)})
    for v in VERTEBRAE:
        frame[v] = pd.to_numeric(qc.get(f"dice_{v}"), errors="coerce")
    frame = frame[frame[list(VERTEBRAE)].notna().any(axis=1)].reset_index(drop=True)
    return frame, frame["study_uid"].tolist()


def plot_dice(dice: dict[str, float], recomputed: pd.DataFrame, path: Path) -> None:
    """Bar chart of the validation Dice per vertebra (+ per-study spread when recomputed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(VERTEBRAE))
    ax.bar(x, [dice.get(v, np.nan) for v in VERTEBRAE], color="#0969da", alpha=0.8,
           label="validation (best checkpoint)")
    if len(recomputed):
        for i, v in enumerate(VERTEBRAE):
            vals = recomputed[v].dropna().to_numpy(float)
            ax.scatter(np.full(len(vals), i) + np.random.default_rng(i).uniform(-.2, .2, len(vals)),
                       vals, s=8, color="k", alpha=0.5, label="per study (cleaned mask)"
                       if i == 0 else None)
    ax.set_xticks(x, VERTEBRAE)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Dice")
    ax.axhline(0.85, ls=":", color="#cf222e", lw=1)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_overlays(work: Path, uids: list[str], path: Path, n: int = 3) -> bool:
    """Sagittal mid-slices of up to ``n`` studies: CT, ground truth, prediction (model grid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import geometry
    from common.atomic import atomic_path
    from common.nifti_io import load_nifti
    from cspine.overview import _tint, _window
    from stage1_segment.prepare import load_cached

    chosen = uids[:n]
    if not chosen:
        return False
    fig, axes = plt.subplots(len(chosen), 2, figsize=(6.4, 3.3 * len(chosen)), squeeze=False)
    for row, uid in enumerate(chosen):
        study = load_cached(sorted(WorkLayout(work).stage1_cache.glob(f"*/{uid}.npz"))[-1])
        ct_mask, ct_affine = load_nifti(WorkLayout(work).stage1_masks / f"{uid}.nii.gz")
        pred, _ = geometry.labels_to_grid(np.asarray(ct_mask), ct_affine, study.affine,
                                          study.image.shape)
        image, aff = geometry.reorient(np.asarray(study.image), study.affine, "LPS")
        truth, _ = geometry.reorient(np.asarray(study.label), study.affine, "LPS")
        pred, _ = geometry.reorient(np.asarray(pred), study.affine, "LPS")
        sx, sy, sz = geometry.spacing_of(aff)
        spine = np.argwhere(truth > 0)
        x = int(np.median(spine[:, 0])) if len(spine) else image.shape[0] // 2
        extent = (0, image.shape[1] * sy, 0, image.shape[2] * sz)
        for col, (labels, name) in enumerate(((truth, "ground truth"), (pred, "predicted"))):
            ax = axes[row, col]
            ax.imshow(_tint(_window(image[x]).T, labels[x].T, 0.45), origin="lower",
                      extent=extent, interpolation="nearest")
            ax.set_title(f"{uid[-12:]} {name}", fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def stage1_section(work: Path, report_dir: Path) -> str:
    out = ["<h2>2. Stage 1: C1–C7 segmentation</h2>"]
    s1 = stage1_dice(work)
    if s1 is None:
        return "".join(out) + missing("stage-1 validation Dice", WorkLayout(work).stage1_run,
                                      "stage1-fit")
    rec, uids = recomputed_dice(work, s1["fold"])
    rows = [["validation Dice (best checkpoint, run.json)",
             *[s1["dice"].get(v, math.nan) for v in VERTEBRAE], s1["mean"]]]
    if len(rec):
        means = [float(rec[v].mean()) for v in VERTEBRAE]
        rows.append([f"cleaned predicted masks, {len(rec)} validation studies",
                     *means, float(np.nanmean(means))])
    out.append(f"<p class='note'>Validation fold {_esc(s1['fold'])}, checkpoint "
               f"<code>{_esc(Path(s1['checkpoint']).name)}</code>, {_esc(s1['epochs'])} epochs. "
               f"The second row scores the engine's labels (largest connected component per "
               f"vertebra) against the aligned ground truth on the model grid.</p>")
    out.append(table(rows, ["", *VERTEBRAE, "mean"], 3))
    plot_dice(s1["dice"], rec, report_dir / "dice.png")
    imgs = [img_tag(report_dir / "dice.png", "stage-1 Dice per vertebra", 560)]
    if plot_overlays(work, uids, report_dir / "overlays.png"):
        imgs.append(img_tag(report_dir / "overlays.png", "stage-1 overlays", 520))
    out.append("<div class='row'>" + "".join(imgs) + "</div>")
    out.append("<p class='note'>Overlays: sagittal slice through the middle of the spine, on the "
               "stage-1 model grid, anterior left, superior up.</p>")
    qc = _csv(WorkLayout(work).qc_crops)
    if qc is not None and "found" in qc:
        incomplete = qc[pd.to_numeric(qc["found"], errors="coerce") < len(VERTEBRAE)]
        out.append(f"<p>{len(qc)} train studies through the engine (<code>make crops</code>); "
                   f"{len(incomplete)} with fewer than 7 vertebrae found.</p>")
    return "".join(out)


def stage2_section(work: Path, report_dir: Path) -> str:
    out = ["<h2>3. Stage 2: fracture classification (out of fold)</h2>"]
    m = stage2_metrics(work)
    if m is None:
        return "".join(out) + missing("stage-2 metrics", WorkLayout(work).metrics, "evaluate")
    base = m.get("baseline_prevalence", {})
    rows = [["constant prevalence (baseline)", base.get("comp_loss", math.nan),
             base.get("comp_loss_global", math.nan)]]
    for rule, s in m.get("rules", {}).items():
        mark = " (chosen)" if rule == m.get("rule") else ""
        rows.append([f"model, patient_overall = {rule}{mark}", s["comp_loss"],
                     s["comp_loss_global"]])
    out.append(f"<p>{_esc(m.get('n_studies'))} studies, {_esc(m.get('n_folds'))} folds; "
               f"competition loss (lower is better):</p>")
    out.append(table(rows, ["prediction", "per-study", "global"]))
    b, c = base.get("comp_loss"), m.get("comp_loss")
    if b and c:
        verdict = "good" if c < b else "bad"
        out.append(f"<p class='{verdict}'>Model {c:.4f} vs baseline {b:.4f}: "
                   f"{(1 - c / b) * 100:+.1f} % loss reduction."
                   + ("" if c < b else " <b>The model does not beat the constant prior out of "
                      "fold: <code>make submit</code> refuses unless told to go on "
                      "(<code>IF_WORSE=go-on</code>) or to submit the prior "
                      "(<code>IF_WORSE=prior</code>).</b>") + "</p>")
    auc = m.get("auc", {})
    out.append(table([["AUC", *[auc.get(t, math.nan) for t in TARGETS],
                       auc.get("mean_vertebra", math.nan)]],
                     ["", *VERTEBRAE, "overall", "mean C1–C7"], 3))
    points = {g: p for g, p in (m.get("operating_points") or {}).items() if isinstance(p, dict)}
    if points:
        out.append("<h3>Operating points (chosen on the OOF rows; <code>cspine validate</code> "
                   "applies them unchanged)</h3>" + table(
                       [[g, name, pt["threshold"], pt["sensitivity"], pt["specificity"]]
                        for g, pts in points.items() for name, pt in pts.items()],
                       ["group", "point", "threshold", "sensitivity", "specificity"], 3))
    per_fold = m.get("comp_loss_per_fold", {})
    if per_fold:
        out.append("<p class='note'>competition loss per fold: " + ", ".join(
            f"fold {k}: {v:.4f}" for k, v in per_fold.items()) + "</p>")
    imgs = [img_tag(report_dir / n, n, 460) for n in ("roc.png", "calibration.png")
            if (report_dir / n).is_file()]
    out.append("<div class='row'>" + "".join(imgs) + "</div>" if imgs else
               missing("ROC / calibration plots", report_dir / "roc.png", "evaluate"))
    sub = WorkLayout(work).submission
    if sub.is_file():
        n = len(pd.read_csv(sub))
        out.append(f"<p>Submission: <code>{_esc(sub)}</code>, {n} rows.</p>")
    return "".join(out)


def _slowest(path: Path, uid_col: str, cols: list[str], n: int = 5) -> pd.DataFrame | None:
    qc = _csv(path)
    if qc is None or "seconds" not in qc or qc.empty:
        return None
    qc = qc.assign(seconds=pd.to_numeric(qc["seconds"], errors="coerce"))
    if "status" in qc:  # a re-run records reused studies as "cached" with ~0 s: not informative
        qc = qc[qc["status"].astype(str) != "cached"]
    if qc.empty:
        return None
    keep = [uid_col, *[c for c in cols if c in qc], "seconds"]
    return qc.sort_values("seconds", ascending=False)[keep].head(n)


def qc_section(work: Path) -> str:
    """Failed studies and the slowest studies of each step."""
    out = ["<h2>4. Quality control: failed and slowest studies</h2>"]
    failed = []
    prep = _csv(WorkLayout(work).qc_prepare)
    if prep is not None and "status" in prep:
        for r in prep[prep["status"].astype(str).str.startswith("fail")].itertuples():
            failed.append(("stage1-prepare", r.study_uid, f"{r.reason}: {r.message}"))
    pred = _csv(WorkLayout(work).qc_crops)
    if pred is not None and "status" in pred:
        for r in pred[pred["status"].astype(str) != "ok"].itertuples():
            failed.append(("crops", r.study_uid, f"{r.status}: {getattr(r, 'message', '')}"))
    man = _csv(WorkLayout(work).manifest)
    if man is not None and "qc_status" in man:
        bad = man[man["qc_status"].astype(str).str.startswith("failed")]
        absent = man[man["qc_status"].astype(str).str.startswith("absent")]
        out.append(f"<p>Crop manifest: {int((man['qc_status'] == 'ok').sum())} crops, "
                   f"{len(absent)} vertebrae marked absent, {len(bad)} rows failed.</p>")
    sub = _csv(WorkLayout(work).submit_qc)
    if sub is not None and "status" in sub:
        for r in sub[sub["status"].astype(str) != "ok"].itertuples():
            failed.append(("submit", r.StudyInstanceUID, r.status))
    if failed:
        out.append(f"<h3>Failed or degraded studies ({len(failed)})</h3>"
                   + table(failed[:30], ["step", "study", "reason"]))
    else:
        out.append("<p class='good'>No failed studies in the QC records.</p>")
    for title, path, uid, cols in (
            ("stage1-prepare (load + resample)", WorkLayout(work).qc_prepare, "study_uid",
             ["split", "status", "src_shape"]),
            ("crops (engine, stage-1 part, train studies)",
             WorkLayout(work).qc_crops, "study_uid",
             ["split", "volume", "found", "dice_mean"]),
            ("submit (engine, test studies)", WorkLayout(work).submit_qc,
             "StudyInstanceUID", ["status", "volume", "crops_used"])):
        slow = _slowest(path, uid, cols)
        if slow is not None:
            out.append(f"<h3>Slowest: {_esc(title)}</h3>" + frame_table(slow))
    return "".join(out)


def _rel(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def write_report(work: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """Build ``WORK/report/index.html`` (module docstring); returns its path."""
    from common.atomic import write_text

    work = Path(work)
    report_dir = WorkLayout(work).report
    report_dir.mkdir(parents=True, exist_ok=True)
    outs = outputs(work)
    runs = wandb_runs(work)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>cspine report: {_esc(work.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>cspine run report: <code>{_esc(work)}</code></h1>",
             f"<p class='note'>data <code>{_esc(data or 'n/a')}</code> · generated "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · outputs: "
             + ", ".join(f"{_esc(k)} <code>{_esc(_rel(p, work))}</code>"
                         for k, p in outs.items()) + "</p>",
             census_section(work), stage1_section(work, report_dir),
             stage2_section(work, report_dir), qc_section(work),
             "<h2>5. Experiment tracking</h2>",
             f"<p>{len(runs)} offline W&amp;B runs (project <code>cspine</code>). Upload: "
             f"<code>wandb sync {_esc(work)}/stage1/wandb/offline-run-* "
             f"{_esc(work)}/stage2/fold*/wandb/offline-run-*</code></p>"
             if runs else "<p class='note'>No offline W&amp;B runs in this folder (WANDB_MODE "
                          "was disabled).</p>",
             "</body></html>"]
    path = report_dir / "index.html"
    write_text(path, "\n".join(parts))
    return path

