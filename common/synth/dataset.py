"""Write a whole synthetic dataset in the RSNA layout, resumably, over worker processes.

Layout written under ``out_dir`` (RSNA_FACTS.md §2)::

    train.csv  test.csv  sample_submission.csv  train_bounding_boxes.csv
    train_images/<UID>/<n>.dcm  test_images/<UID>/<n>.dcm  segmentations/<UID>.nii

plus two things that are not part of the RSNA layout: ``_synth_state.json`` (the config and the
finished studies, for resuming) and ``_synth_truth/`` (``test_labels.csv`` with the labels of
the test studies, which RSNA does not publish, and ``studies.csv`` with each study's geometry,
numbering, compression and fractures).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from common.atomic import write_csv as _write_csv
from common.atomic import write_json
from common.labels import OVERALL, VERTEBRAE
from common.synth.plan import StudyImage, StudyPlan, fracture_boxes, plan_studies, render_study
from common.synth.presets import SynthConfig, config_from_dict, make_config
from common.synth.writer import write_mask, write_series

STATE = "_synth_state.json"
TRUTH = "_synth_truth"
STATE_VERSION = 1
#: Bump whenever the phantom, the writer or the plan changes what a config produces, so that a
#: dataset written by older code is not silently "resumed" with newer studies.
GENERATOR_VERSION = 2
#: Everything ``generate`` may create (and ``overwrite`` may delete) directly under out_dir.
OWNED = ("train.csv", "test.csv", "sample_submission.csv", "train_bounding_boxes.csv",
         "train_images", "test_images", "segmentations", TRUTH, STATE)
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]


class SynthStateError(RuntimeError):
    """The output folder cannot be used: other content, or a dataset with another config."""


def generate(out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
             progress: bool = True, **overrides: Any) -> Path:
    """Write (or finish writing) a synthetic RSNA-layout dataset.

    Args:
        out_dir: the dataset root (created).
        preset: "tiny", "demo" or "full" (see :mod:`common.synth.presets`).
        seed: master seed; the same seed and config give identical pixels and CSVs.
        overwrite: replace a dataset written with a different config (only the files this
            generator writes are deleted).
        progress: show a tqdm bar over studies.
        **overrides: any :class:`~common.synth.presets.SynthConfig` field.

    Returns:
        The dataset root.

    Raises:
        SynthStateError: ``out_dir`` holds other files, or a dataset with another config and
            ``overwrite`` is False.
        RuntimeError: some studies failed (the others are written and recorded; re-run to
            retry only the failed ones).
    """
    cfg = make_config(preset, seed, **overrides)
    out = Path(out_dir)
    state = _open_state(out, cfg, overwrite)
    plans = plan_studies(cfg)
    todo = [p for p in plans if p.uid not in state["complete"]]
    failures = []
    for uid, record in _run(cfg, out, todo, progress):
        if isinstance(record, Exception):
            failures.append(f"{uid}: {type(record).__name__}: {record}")
            continue
        state["complete"][uid] = record
        write_json(out / STATE, state)
    if failures:
        raise RuntimeError(f"{len(failures)} synthetic studies failed (re-run to retry):\n"
                           + "\n".join(failures))
    _write_tables(out, plans, state["complete"], cfg)
    state["finished"] = True
    write_json(out / STATE, state)
    return out


def _open_state(out: Path, cfg: SynthConfig, overwrite: bool) -> dict[str, Any]:
    fresh = {"version": STATE_VERSION, "generator": GENERATOR_VERSION,
             "config": cfg.identity(), "finished": False, "complete": {}}
    path = out / STATE
    if path.exists():
        state = json.loads(path.read_text())
        old = state.get("config", {})
        # fields added since the dataset was written: their defaults reproduce the old data
        defaults = SynthConfig().identity()
        old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
        diff = sorted(k for k in set(old) | set(fresh["config"])
                      if old.get(k) != fresh["config"].get(k))
        for key in ("version", "generator"):
            if state.get(key) != fresh[key]:
                diff.append(f"{key} {state.get(key)} -> {fresh[key]}")
        if not diff:
            return state
        if not overwrite:
            raise SynthStateError(
                f"{out} holds a synthetic dataset made with a different config (differs in "
                f"{diff}). Use another folder, the same options, or "
                f"--overwrite to replace it.")
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif out.exists() and any(out.iterdir()):
        raise SynthStateError(
            f"{out} is not empty and was not written by `cspine synth` (no {STATE}); "
            f"choose an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, fresh)
    return fresh


def _run(cfg: SynthConfig, out: Path, todo: list[StudyPlan], progress: bool
         ) -> Iterable[tuple[str, dict[str, Any] | Exception]]:
    """Yield (uid, record or exception) per study as they finish."""
    bar = tqdm(total=len(todo), desc=f"synth {cfg.preset}", unit="study", disable=not progress)
    workers = min(cfg.workers, len(todo))
    try:
        if workers <= 1:
            for plan in todo:
                try:
                    yield plan.uid, write_study(cfg, plan, out)
                except Exception as exc:  # one bad study never stops the batch
                    yield plan.uid, exc
                bar.update()
            return
        from common.procs import pool_initializer
        init, initargs = pool_initializer()

        with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                                 initializer=init, initargs=initargs) as pool:
            futures = {pool.submit(write_study, cfg, plan, out): plan.uid for plan in todo}
            for fut in as_completed(futures):
                exc = fut.exception()
                yield futures[fut], exc if exc is not None else fut.result()
                bar.update()
    finally:
        bar.close()


def _mp_context() -> multiprocessing.context.BaseContext:
    """:func:`common.procs.worker_context` with this module preloaded."""
    from common.procs import worker_context

    return worker_context(["common.synth.dataset"])


def write_study(cfg: SynthConfig, plan: StudyPlan, out: Path) -> dict[str, Any]:
    """Render one study and write its DICOM folder and mask; returns its record for the state."""
    image = render_study(cfg, plan)
    folder = out / f"{plan.split}_images" / plan.uid
    if folder.exists():  # left over from an interrupted run
        shutil.rmtree(folder)
    write_series(folder, plan.uid, image.rendered.hu, image.affine, image.file_numbers,
                 image.pixel_spacing, image.thickness, plan.jpeg, plan.header)
    if plan.mask:
        write_mask(out / "segmentations" / f"{plan.uid}.nii", image.rendered.labels,
                   image.affine, plan.mask_dtype)
    return study_record(plan, image)


def study_record(plan: StudyPlan, image: StudyImage) -> dict[str, Any]:
    """JSON-ready summary of a written study (labels, geometry, fractures, boxes)."""
    present = sorted({int(v) for v in set(image.rendered.labels.ravel().tolist()) if v})
    return {
        "plan": plan.to_dict(),
        "n_slices": int(image.rendered.hu.shape[2]),
        "pixel_spacing": image.pixel_spacing, "z_spacing": image.z_spacing,
        "thickness": image.thickness,
        "labels_present": present,
        "fractured_voxels": {k: int(len(v)) for k, v in image.rendered.fracture_voxels.items()},
        "boxes": fracture_boxes(image, plan.uid) if plan.boxes else [],
    }


def without_images_uids(plans: list[StudyPlan], n: int) -> list[str]:
    """UIDs of ``n`` test.csv studies without images: after the largest generated suffix."""
    top = max(int(p.uid.rsplit(".", 1)[1]) for p in plans)
    prefix = plans[0].uid.rsplit(".", 1)[0]
    return [f"{prefix}.{top + 1 + i}" for i in range(n)]


def _write_tables(out: Path, plans: list[StudyPlan], records: dict[str, dict[str, Any]],
                  cfg: SynthConfig) -> None:
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    label_cols = [OVERALL, *VERTEBRAE]
    write_csv(out / "train.csv", pd.DataFrame(
        [{"StudyInstanceUID": p.uid, **{c: p.labels[c] for c in label_cols}} for p in train],
        columns=["StudyInstanceUID", *label_cols]))
    listed = [p.uid for p in test] + without_images_uids(plans, cfg.test_without_images)
    rows = [{"row_id": f"{uid}_{t}", "StudyInstanceUID": uid, "prediction_type": t}
            for uid in listed for t in cfg.test_types]
    write_csv(out / "test.csv",
              pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]))
    write_csv(out / "sample_submission.csv", pd.DataFrame(
        [{"row_id": r["row_id"], "fractured": 0.5} for r in rows], columns=["row_id", "fractured"]))
    boxes = [b for p in train for b in records[p.uid]["boxes"]]
    write_csv(out / "train_bounding_boxes.csv", pd.DataFrame(boxes, columns=BOX_COLUMNS))
    write_csv(out / TRUTH / "test_labels.csv", pd.DataFrame(
        [{"StudyInstanceUID": p.uid, **{c: p.labels[c] for c in label_cols}} for p in test],
        columns=["StudyInstanceUID", *label_cols]))
    summary = []
    for p in plans:
        r = records[p.uid]
        summary.append({
            "StudyInstanceUID": p.uid, "split": p.split, "n_slices": r["n_slices"],
            "pixel_spacing": r["pixel_spacing"], "z_spacing": r["z_spacing"],
            "thickness": r["thickness"], "direction": "ascending" if p.reversed else "descending",
            "first_file": p.start, "transfer_syntax": "jpeg_lossless" if p.jpeg else "explicit_le",
            "mask": p.mask_dtype if p.mask else "", "boxes": len(r["boxes"]),
            **{k: p.header.get(k, "") for k in ("Manufacturer", "ConvolutionKernel")
               if any(q.header.get(k) for q in plans)},
            "fractures": ";".join(f"{v}:{k}" for v, k in p.fractures.items())})
    write_csv(out / TRUTH / "studies.csv", pd.DataFrame(summary))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Atomic CSV write, readable by everyone like the rest of a dataset (mode 0644)."""
    _write_csv(path, frame)
    path.chmod(0o644)


def load_config(out_dir: str | Path) -> SynthConfig:
    """The config a synthetic dataset was written with (from ``_synth_state.json``)."""
    state = json.loads((Path(out_dir) / STATE).read_text())
    return config_from_dict(state["config"])


def rerender(out_dir: str | Path, uid: str, fractures: bool = True) -> StudyImage:
    """Render study ``uid`` of a written synthetic dataset again, in memory.

    Args:
        fractures: False gives the same study without its fractures.
    """
    cfg = load_config(out_dir)
    plan = next((p for p in plan_studies(cfg) if p.uid == uid), None)
    if plan is None:
        raise KeyError(f"{uid} is not a study of the synthetic dataset {out_dir}")
    return render_study(cfg, plan, fractures=fractures)
