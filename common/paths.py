"""Data and work roots from environment variables, resolved lazily with helpful errors.

* ``CSPINE_DATA``: a folder in the RSNA layout (train.csv, train_images/, …); read-only.
* ``CSPINE_WORK``: where derived files go (folds.csv, stage1/, stage2/, …).

Command-line arguments always win; these are the fallbacks when a path is not given.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "CSPINE_DATA"
WORK_ENV = "CSPINE_WORK"


def _root(env: str, given: str | os.PathLike | None, what: str, must_exist: bool) -> Path:
    if given is not None:
        path = Path(given)
    elif os.environ.get(env):
        path = Path(os.environ[env])
    else:
        raise RuntimeError(f"no {what} folder given: pass it as an argument or set {env} "
                           f"(e.g. export {env}=/path/to/{what})")
    path = path.expanduser()
    if must_exist and not path.is_dir():
        source = "argument" if given is not None else f"${env}"
        raise FileNotFoundError(f"{what} folder {path} (from {source}) does not exist or is not "
                                f"a directory")
    return path


def data_root(given: str | os.PathLike | None = None) -> Path:
    """The RSNA-layout data folder: ``given`` if not None, else ``$CSPINE_DATA``; must exist."""
    return _root(DATA_ENV, given, "data", must_exist=True)


def work_root(given: str | os.PathLike | None = None, create: bool = True) -> Path:
    """The work folder: ``given`` if not None, else ``$CSPINE_WORK``; created when ``create``."""
    path = _root(WORK_ENV, given, "work", must_exist=False)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def folds_path(work: str | os.PathLike | None = None) -> Path:
    """The shared folds CSV, ``<work>/folds.csv``, read by both stages."""
    from common.layout import WorkLayout

    return WorkLayout(work_root(work, create=False)).folds


def run_relative(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """``path`` as recorded in a ``run.json`` in ``run_dir``: relative to ``run_dir`` (so a
    copied or moved WORK uses its own checkpoints), or absolute when it lies elsewhere."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def run_resolve(recorded: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """The file a ``run.json`` in ``run_dir`` names: a relative path is taken from ``run_dir``;
    an absolute one (older runs) is replaced by ``run_dir/checkpoints/<its name>`` when that
    exists, so a copied WORK never reads the original's checkpoints."""
    recorded, run_dir = Path(recorded), Path(run_dir)
    if not recorded.is_absolute():
        return run_dir / recorded
    local = run_dir / "checkpoints" / recorded.name
    return local if local.is_file() else recorded
