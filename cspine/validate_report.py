"""The page and plots of ``cspine validate``: ``OUT/index.html`` (self-contained: every image
embedded as base64, no script, no network), ``OUT/roc.png`` and ``OUT/reliability.png``.

Sections: 1. studies (listed, scored, unreadable with their reasons); 2. discrimination (AUC
with 95 % CI per target, the competition metric); 3. operating points (thresholds chosen on the
training run's OOF rows, applied unchanged: sensitivity, specificity, PPV, NPV with CIs, PPV /
NPV at the given prevalence); 4. calibration (reliability diagram, ECE, recalibration);
5. subgroups; 6. comparison of two runs; 7. error review (false negatives and false positives
at the chosen operating point with their overview images, most confident first).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.labels import OVERALL, VERTEBRAE
from cspine.report import CSS, _esc, img_tag, table

UID = "StudyInstanceUID"
#: Most error cases shown with their image, per kind (the rest are listed in a table).
MAX_ERROR_IMAGES = 30


def ci(e: dict[str, Any] | None, nd: int = 3) -> str:
    """``0.912 (0.871–0.948)`` from an Estimate JSON; ``n/a`` when undefined."""
    if not e or e.get("value") is None:
        return "n/a"
    if e.get("ci_low") is None:
        return f"{e['value']:.{nd}f}"
    return f"{e['value']:.{nd}f} ({e['ci_low']:.{nd}f}–{e['ci_high']:.{nd}f})"


def plot_roc(frame: pd.DataFrame, path: Path) -> None:
    """ROC of patient_overall and of the pooled vertebrae on the scored studies → PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from common.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4.6))
    for name, cols, lw in (("patient_overall", [OVERALL], 2.4),
                           ("C1-C7 pooled", list(VERTEBRAE), 1.4)):
        y = frame[cols].to_numpy().ravel()
        p = frame[[f"p_{c}" for c in cols]].to_numpy().ravel()
        if np.unique(y).size == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=lw, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on the validation site")
    ax.legend(loc="lower right", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_reliability(metrics: dict[str, Any], path: Path) -> None:
    """Reliability diagram (uniform bins) of patient_overall and the pooled vertebrae → PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4.6))
    for group, cal in metrics["calibration"].items():
        c = cal["curve"]
        ax.plot(c["mean_predicted"], c["observed"], "o-",
                label=f"{group} (ECE {ci(cal['ece'])})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed fraction", xlim=(0, 1),
           ylim=(0, 1), title="Reliability on the validation site")
    ax.legend(loc="upper left", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def _studies(m: dict[str, Any]) -> str:
    parts = [f"<p>{m['n_listed']} studies listed, <b>{m['n_scored']} scored</b>, "
             f"{m['n_unreadable']} unreadable (not scored; every statistic below covers the "
             f"{m['n_scored']} scored studies). Prevalence on this site: patient "
             f"{_fmt(m['prevalence_site'][OVERALL])}.</p>"]
    if m.get("n_implausible"):
        parts.append(f"<p class='warn'><b>{m['n_implausible']} scored studies have a "
                     f"segmentation that failed the anatomy check</b> (implausible_segmentation: "
                     f"their probabilities are the models' prior, as the pipeline reports them; "
                     f"see their overviews and records).</p>")
    if m["unreadable"]:
        parts.append("<h3>Unreadable studies</h3>" + table(
            [(u[UID], u["reason"], u["path"] or "(no path)") for u in m["unreadable"]],
            ["study", "reason", "path"]))
    return "".join(parts)


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _discrimination(m: dict[str, Any]) -> str:
    rows = [(name, ci(a), a["positives"], a["negatives"]) for name, a in m["auc"].items()]
    b = m["bootstrap"]
    return (table(rows, ["target", "AUC (95 % CI)", "positives", "negatives"]) +
            f"<p>Competition metric (weighted log loss, per-study form; lower is better): "
            f"<b>{ci(m['comp_loss'], 4)}</b>.</p><p class='note'>95 % percentile intervals of a "
            f"patient-level bootstrap ({b['replicates']} replicates redrawing studies, seed "
            f"{b['seed']}); AUC and ROC by scikit-learn.</p>")


def _operating(m: dict[str, Any]) -> str:
    ops = m["operating_points"]
    pi = m["prevalence"]
    header = ["group", "point", "threshold", "OOF sens / spec", "sensitivity", "specificity",
              "PPV", "NPV", f"PPV at {pi:.0%}", f"NPV at {pi:.0%}", "TP / FP / TN / FN"]
    rows = []
    for group in (OVERALL, "vertebrae"):
        for name, pt in ops[group].items():
            s = pt["site"]
            mark = " *" if name == m["operating_point"] else ""
            rows.append((group, name + mark, f"{pt['threshold']:.3f}",
                         f"{pt['oof']['sensitivity']:.2f} / {pt['oof']['specificity']:.2f}",
                         ci(s["sensitivity"]), ci(s["specificity"]), ci(s["ppv"]),
                         ci(s["npv"]), ci(s["ppv_at_prevalence"]), ci(s["npv_at_prevalence"]),
                         f"{s['tp']} / {s['fp']} / {s['tn']} / {s['fn']}"))
    per = [(v, ci(r["sensitivity"]), ci(r["specificity"]), f"{r['tp']}/{r['fn']}")
           for v, r in ops["per_vertebra"].items()]
    return (table(rows, header) +
            "<p class='note'>Thresholds were chosen on the training run's out-of-fold "
            "predictions (<code>make evaluate</code>) and applied unchanged here; "
            "'vertebrae' pools C1–C7 (one threshold for each vertebra). * = the point of the "
            "error review.</p><h3>Per vertebra at the pooled threshold of "
            f"{_esc(m['operating_point'])}</h3>" +
            table(per, ["vertebra", "sensitivity", "specificity", "TP/FN"]))


def _calibration(m: dict[str, Any], out: Path) -> str:
    parts = [f"<div class='row'>{img_tag(out / 'reliability.png', 'reliability diagram')}"
             f"{img_tag(out / 'roc.png', 'ROC curves')}</div>",
             table([(g, ci(c["ece"])) for g, c in m["calibration"].items()],
                   ["group", "expected calibration error (95 % CI)"])]
    rc = m.get("recalibration")
    if rc:
        rows = [(g, "n/a", "n/a", r["error"]) if "error" in r else
                (g, ci(r["ece_before"]), ci(r["ece_after"]), f"a={r['a']:.3f}, b={r['b']:.3f}")
                for g, r in rc["groups"].items()]
        parts.append(f"<h3>Recalibration (Platt) fitted on {len(rc['fit_studies'])} studies "
                     f"({rc['share']:.0%}), reported on the other {len(rc['report_studies'])}"
                     "</h3>" + table(rows, ["group", "ECE before", "ECE after", "fit"]) +
                     f"<p>Metric on the report studies: {ci(rc['comp_loss_before'], 4)} before, "
                     f"{ci(rc['comp_loss_after'], 4)} after.</p>")
    return "".join(parts)


def _subgroups(m: dict[str, Any]) -> str:
    if not m["subgroups"]:
        return "<p class='note'>No subgroup field was recorded for these studies.</p>"
    parts = []
    for f, rows in m["subgroups"].items():
        body = [(r["value"], r["n"], r["positives"],
                 ci(r.get("auc_overall")) if "note" not in r else r["note"],
                 ci(r.get("auc_vertebrae_pooled")) if "note" not in r else "",
                 ci(r["overall_at_point"]["sensitivity"]) if "note" not in r else "",
                 ci(r["overall_at_point"]["specificity"]) if "note" not in r else "",
                 ci(r.get("comp_loss"), 4) if "note" not in r else "") for r in rows]
        parts.append(f"<h3>{_esc(f)}</h3>" + table(body, [
            "value", "studies", "positive", "AUC patient", "AUC C1–C7 pooled",
            f"sensitivity ({m['operating_point']})", "specificity", "metric"]))
    return "".join(parts) + (f"<p class='note'>A subgroup under {m['min_subgroup']} studies "
                             "(or with one class) shows its counts only.</p>")


def _compare(m: dict[str, Any]) -> str:
    c = m.get("compare")
    if not c:
        return "<p class='note'>No second run given (<code>--compare WORK_B</code>).</p>"
    return (f"<p>Run A <code>{_esc(m['work'])}</code> minus run B <code>{_esc(m['compare_work'])}"
            f"</code> on the same {c['n_studies']} studies (paired bootstrap).</p>" +
            table([("AUC patient_overall", ci(c["auc_overall"])),
                   ("AUC C1–C7 pooled", ci(c["auc_vertebrae_pooled"])),
                   ("competition metric", ci(c["comp_loss"], 4))], ["difference A − B", "95 % CI"]))


def _errors(m: dict[str, Any], out: Path) -> str:
    t = m["operating_points"][OVERALL][m["operating_point"]]["threshold"]
    parts = [f"<p>patient_overall at <b>{_esc(m['operating_point'])}</b> (threshold {t:.3f}); "
             "false negatives from the lowest probability, false positives from the highest."
             "</p>"]
    for kind, title in (("false_negatives", "False negatives"),
                        ("false_positives", "False positives")):
        cases = m["errors"][kind]
        parts.append(f"<h3>{title}: {len(cases)}</h3>")
        for case in cases[:MAX_ERROR_IMAGES]:
            png = out / "overviews" / f"{case[UID]}.png"
            fr = ", ".join(case["fractured"]) or "none"
            probs = " ".join(f"{v} {p:.2f}" for v, p in case["probabilities"].items())
            img = img_tag(png, f"overview {case[UID]}", width=560) if png.is_file() else \
                "<p class='missing'>overview missing</p>"
            parts.append(f"<div class='case'><p><code>{_esc(case[UID])}</code> p={case['p']:.3f}"
                         f" · fractured: {_esc(fr)} · {_esc(probs)}</p>{img}</div>")
        if len(cases) > MAX_ERROR_IMAGES:
            parts.append(table([(c[UID], f"{c['p']:.3f}") for c in cases[MAX_ERROR_IMAGES:]],
                               ["study (no image shown)", "p"]))
    return "".join(parts)


def write_page(out: Path, frame: pd.DataFrame, metrics: dict[str, Any]) -> Path:
    """Write the plots and ``OUT/index.html``; returns the page's path."""
    from common.atomic import write_text

    out = Path(out)
    title = f"cspine validation: {Path(metrics.get('dataset', '')).name}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}"
             f"</title><style>{CSS}.case{{margin:8px 0 18px}}</style></head><body>",
             f"<h1>{_esc(title)}</h1><p class='note'>models <code>{_esc(metrics.get('work'))}"
             f"</code> · data <code>{_esc(metrics.get('dataset'))}</code> · generated "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
             "<h2>1. Studies</h2>", _studies(metrics)]
    if metrics["n_scored"]:
        ok = frame[frame["status"] == "ok"]
        plot_roc(ok, out / "roc.png")
        plot_reliability(metrics, out / "reliability.png")
        parts += ["<h2>2. Discrimination</h2>", _discrimination(metrics),
                  "<h2>3. Operating points</h2>", _operating(metrics),
                  "<h2>4. Calibration</h2>", _calibration(metrics, out),
                  "<h2>5. Subgroups</h2>", _subgroups(metrics),
                  "<h2>6. Comparison of two runs</h2>", _compare(metrics),
                  "<h2>7. Error review</h2>", _errors(metrics, out)]
    parts.append("</body></html>")
    path = out / "index.html"
    write_text(path, "\n".join(parts))
    return path

