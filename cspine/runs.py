"""Whether a training step runs, and how: one tested decision instead of shell in the Makefile.

``make stage1-fit`` and ``make stage2-fit`` call ``cspine fit stage1|stage2`` (this module). For
each run folder (``WORK/stage1``, ``WORK/stage2/fold<k>``):

1. the step's settings are read through the stage's own parser (:mod:`common.cli_settings`:
   the ``-c`` files plus ``--section.key`` overrides, with defaults and links applied), and the
   keys that cannot change the trained weights are dropped (paths, the logger, progress bars,
   worker counts of the data preparation; :data:`STAGE1_IGNORED`, :data:`STAGE2_IGNORED`);
2. :func:`fingerprint` hashes those settings with the contents of the input tables
   (``folds.csv``, ``train.csv``; for stage 2 also the crop manifest, whose rows name the stage-1
   run that made each crop), so a comment in a YAML changes nothing and a missing table is an
   error, not a different hash;
3. :func:`decide` — a pure function of (finished?, recorded fingerprint, last checkpoint?) and the
   new fingerprint — gives ``skip`` (finished with the same inputs), ``resume`` (interrupted,
   same inputs: ``--ckpt_path last``), ``retire`` (anything recorded with other inputs, or of
   unknown origin: moved aside to ``<run>.stale-<n>/``, never deleted, then trained afresh) or
   ``fresh``;
4. the fit runs as ``python -m stage1_segment fit …`` / ``python -m stage2_classify fit …`` in a
   child process (a fold never inherits another's state), with the fingerprint written first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common.layout import WorkLayout

DECISIONS = ("skip", "resume", "retire", "fresh")
FINGERPRINT = "fit.fingerprint"
#: Settings that cannot change stage 1's weights: paths, logging, the cache-building processes,
#: and the crop settings (used by `make crops`, not by the fit).
STAGE1_IGNORED = ("config", "data.data_root", "data.work_dir", "data.prepare_jobs",
                  "checkpoint.dirpath", "trainer.logger", "trainer.enable_progress_bar",
                  "crops")
#: The same for stage 2 (its inputs' contents are hashed separately).
STAGE2_IGNORED = ("config", "data.manifest", "data.data_root", "data.folds_csv", "checkpoint.dirpath",
                  "trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar",
                  "oof_dir", "threads")


@dataclass(frozen=True)
class RunState:
    """What a run folder holds.

    Attributes:
        finished: ``run.json`` exists (written at the end of a fit).
        recorded: the fingerprint written when the run started (None: none recorded).
        has_last: ``checkpoints/last.ckpt`` exists (something to resume).
    """

    finished: bool
    recorded: str | None
    has_last: bool


def decide(state: RunState, fingerprint: str) -> str:
    """``skip`` | ``resume`` | ``retire`` | ``fresh`` for a run folder in ``state`` whose inputs
    now hash to ``fingerprint`` (module docstring, step 3)."""
    if state.recorded is None:  # nothing recorded: leftovers of unknown origin are not reused
        return "retire" if state.finished or state.has_last else "fresh"
    if state.recorded != fingerprint:
        return "retire"
    if state.finished:
        return "skip"
    return "resume" if state.has_last else "fresh"


def run_state(run_dir: str | os.PathLike) -> RunState:
    """The :class:`RunState` of ``run_dir`` (a missing folder is empty)."""
    run_dir = Path(run_dir)
    fp = run_dir / FINGERPRINT
    return RunState(finished=(run_dir / "run.json").is_file(),
                    recorded=(fp.read_text().strip() or None) if fp.is_file() else None,
                    has_last=(run_dir / "checkpoints" / "last.ckpt").is_file())


def _file_digest(path: Path, make_hint: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the fit needs it ({make_hint})")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(settings: dict[str, Any], inputs: dict[str, tuple[Path, str]],
                ignored: Sequence[str]) -> str:
    """16 hex digits of sha256 over the settings without ``ignored`` keys and the contents of
    ``inputs`` (name → (path, the make target that writes it, for the error)).

    Raises:
        FileNotFoundError: an input is missing (naming it and the target that writes it).
    """
    from common.cli_settings import strip_keys

    doc = {"settings": strip_keys(settings, ignored),
           "inputs": {name: _file_digest(Path(p), hint) for name, (p, hint) in inputs.items()}}
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def retire(run_dir: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> Path | None:
    """Move the existing ``paths`` of a run into a new ``<run_dir>.stale-<n>/`` (n = 1, 2, …;
    earlier stale folders are kept). Returns that folder, or None when nothing existed."""
    run_dir = Path(run_dir)
    present = [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if not present:
        return None
    n = 1
    while Path(f"{run_dir}.stale-{n}").exists():
        n += 1
    stale = Path(f"{run_dir}.stale-{n}")
    stale.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), str(stale / p.name))
    return stale


Launcher = Callable[[list[str]], int]


def _launch(cmd: list[str]) -> int:
    """Run a fit in a child process (inherits the environment, e.g. WANDB_MODE)."""
    return subprocess.run(cmd).returncode


def _step(label: str, run_dir: Path, fp: str, movable: Sequence[Path], cmd: list[str],
          launch: Launcher) -> int:
    """Decide, say what happens, retire / resume / skip, and launch."""
    state = run_state(run_dir)
    decision = decide(state, fp)
    if decision == "skip":
        print(f"{label}: done, inputs unchanged ({run_dir / 'run.json'}; delete it to retrain)")
        return 0
    if decision == "retire":
        stale = retire(run_dir, movable)
        why = "recorded with other settings or inputs" if state.recorded else \
            "left without a fingerprint"
        print(f"{label}: the run in {run_dir} was {why}; moved it to {stale} and training "
              f"again")
    if decision == "resume":
        print(f"{label}: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}")
        cmd = [*cmd, "--ckpt_path", "last"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FINGERPRINT).write_text(fp + "\n")
    return launch(cmd)


def fit_stage1(data: str | os.PathLike, work: str | os.PathLike, configs: Sequence[str],
               overrides: Sequence[str] = (), jobs: int = 2,
               launch: Launcher = _launch) -> int:
    """``make stage1-fit``: fit the segmenter unless finished with the same inputs (module
    docstring). Returns the exit status of the fit (0 when skipped)."""
    from stage1_segment.cli import parse_settings
    from stage1_segment.prepare import stage1_args

    data, work = Path(data), Path(work)
    args = [*stage1_args(configs, data, work, overrides), "--data.prepare_jobs", str(jobs)]
    settings = parse_settings(args).as_dict()
    layout = WorkLayout(work)
    fp = fingerprint(settings, {"folds": (layout.folds, "make folds"),
                                "labels": (data / "train.csv", "the RSNA layout")},
                     STAGE1_IGNORED)
    run_dir = layout.stage1
    movable = [run_dir / n for n in ("checkpoints", "run.json", "wandb", "configs", FINGERPRINT)]
    return _step("stage 1 fit", run_dir, fp, movable,
                 [sys.executable, "-m", "stage1_segment", "fit", *args], launch)


def fit_stage2(data: str | os.PathLike, work: str | os.PathLike, configs: Sequence[str],
               folds: Sequence[int], overrides: Sequence[str] = (),
               launch: Launcher = _launch) -> int:
    """``make stage2-fit``: fit each fold in turn unless finished with the same inputs; stops
    at the first fold whose fit fails (its exit status)."""
    from stage2_classify.cli import parse_settings

    data, work = Path(data), Path(work)
    layout = WorkLayout(work)
    manifest, folds_csv = layout.manifest, layout.folds
    inputs = {"manifest": (manifest, "make crops"), "folds": (folds_csv, "make folds"),
              "labels": (data / "train.csv", "the RSNA layout")}
    for k in folds:
        run_dir, oof = layout.fold(k), layout.oof_fold(k)
        args = [*[a for c in configs for a in ("-c", str(c))], "--data.fold", str(k),
                "--data.manifest", str(manifest), "--data.data_root", str(data),
                "--data.folds_csv", str(folds_csv), "--trainer.default_root_dir", str(run_dir),
                "--trainer.logger.init_args.save_dir", str(run_dir),
                "--trainer.logger.init_args.name", f"stage2-fold{k}",
                "--oof_dir", str(oof.parent), *overrides]
        fp = fingerprint(parse_settings(args).as_dict(), inputs, STAGE2_IGNORED)
        status = _step(f"stage 2 fold {k}", run_dir, fp, [run_dir, oof],
                       [sys.executable, "-m", "stage2_classify", "fit", *args], launch)
        if status:
            return status
    return 0
