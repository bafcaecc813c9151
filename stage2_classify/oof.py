"""Out-of-fold predictions: one file per fold after ``fit``, merged for evaluation.

``<oof_dir>/fold<k>.csv`` (wide): ``StudyInstanceUID, C1..C7, patient_overall, fold`` for every
labelled study of fold k, scored by fold k's chosen checkpoint; vertebrae without a crop hold the
training-fold prior and ``patient_overall`` is noisy-OR (the evaluation re-aggregates it by every
rule). ``<fold_dir>/run.json`` records which checkpoint was chosen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from common.atomic import write_csv
from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.metric import competition_loss
from common.run_record import write_run_record
from stage2_classify.aggregate import aggregate, clip_probs, crops_to_study

UID = "StudyInstanceUID"


def save_final_checkpoint(trainer: Any) -> Path | None:
    """Write the end-of-training state as ``<checkpoint dir>/last.ckpt``; call on **every** rank
    (Lightning's ``save_checkpoint`` synchronises the ranks, rank 0 writes).

    Lightning's own ``save_last`` rewrites last.ckpt only in an epoch that saved a top-k
    checkpoint, so with a stock ``ModelCheckpoint`` it can hold the best validation epoch, chosen
    on the very rows the OOF scores; the shipped configs use
    :class:`common.checkpoints.EpochEndModelCheckpoint`, and this makes any config safe.
    Returns the path, or None without a checkpoint callback.
    """
    cbs = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if not cbs:
        return None
    last = Path(cbs[0].dirpath) / "last.ckpt"
    trainer.save_checkpoint(str(last))
    return last


def chosen_checkpoint(trainer: Any, which: str = "last") -> tuple[Path, float | None]:
    """The checkpoint whose predictions become the fold's OOF rows, with its monitored score.

    ``"last"`` (default) is the end of the cosine schedule (:func:`save_final_checkpoint`); it is
    chosen without looking at the validation fold, so the OOF score is not biased by checkpoint
    selection on the rows it scores.
    ``"best"`` is the best ``val/comp_loss`` epoch (optimistic as an OOF estimate).
    """
    cbs = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if which == "best":
        for cb in cbs:
            if cb.best_model_path and Path(cb.best_model_path).exists():
                score = cb.best_model_score
                return Path(cb.best_model_path), float(score) if score is not None else None
    for cb in cbs:
        last = cb.last_model_path or str(Path(cb.dirpath) / "last.ckpt")
        if Path(last).exists():
            return Path(last), None
    raise FileNotFoundError("fit wrote no checkpoint: keep a ModelCheckpoint(save_last=True) "
                            "callback in the config")


def write_fold_oof(trainer: Any, model: Any, datamodule: Any, fold_dir: Path, oof_dir: Path,
                   which: str = "last") -> pd.DataFrame:
    """Score fold k's validation crops with the chosen checkpoint; write ``fold<k>.csv`` and run.json.

    ``run.json`` names the checkpoint that ``make submit`` and ``cspine predict`` use for this fold.

    Returns:
        the wide OOF frame of this fold.
    """
    from stage2_classify.inference import load_model, score_rows

    start = time.perf_counter()
    ckpt, score = chosen_checkpoint(trainer, which)
    best = load_model(ckpt, map_location="cpu")
    fold = int(datamodule.hparams.fold)
    crops = score_rows([best], datamodule.val_ds.rows, datamodule.hparams.batch_size)
    wide = aggregate(crops_to_study(crops.dropna(subset=["prob"]), datamodule.val_uids,
                                    datamodule.prior), "noisy_or", clip=(0.0, 1.0))
    wide["fold"] = fold
    write_csv(Path(oof_dir) / f"fold{fold}.csv", wide.reset_index())
    loss = competition_loss(datamodule.val_labels, clip_probs(wide[list(TARGETS)]))
    cb = trainer.checkpoint_callback
    write_run_record(
        fold_dir, "stage2", checkpoint=ckpt,
        best_checkpoint=getattr(cb, "best_model_path", None) or None,
        last_checkpoint=getattr(cb, "last_model_path", None) or None,
        monitor=getattr(cb, "monitor", None), best_score=score,
        epochs=trainer.current_epoch,
        metrics={"oof_comp_loss_noisy_or": loss, "val_studies": len(wide),
                 "val_crops": len(crops), "oof_seconds": time.perf_counter() - start},
        fold=fold, chosen=which, prior=datamodule.prior)
    print(f"fold {fold}: OOF comp_loss {loss:.4f} (noisy-OR) from {ckpt.name} -> "
          f"{Path(oof_dir) / f'fold{fold}.csv'}")
    return wide


def merge_oof(oof_dir: str | Path) -> pd.DataFrame:
    """Concatenate ``fold*.csv`` into one wide frame indexed by StudyInstanceUID (+ ``fold``).

    Raises:
        FileNotFoundError: no fold files. ValueError: a study in two folds.
    """
    files = sorted(Path(oof_dir).glob("fold*.csv"))
    if not files:
        raise FileNotFoundError(f"no OOF files {Path(oof_dir)}/fold<k>.csv: run `make stage2-fit`")
    frame = pd.concat([pd.read_csv(f, dtype={UID: str}) for f in files], ignore_index=True)
    dup = frame[UID][frame[UID].duplicated()].tolist()
    if dup:
        raise ValueError(f"{oof_dir}: studies in more than one fold file {dup[:5]}")
    missing = [c for c in (*VERTEBRAE, OVERALL, "fold") if c not in frame.columns]
    if missing:
        raise ValueError(f"{oof_dir}: OOF files lack columns {missing}")
    return frame.set_index(UID)

