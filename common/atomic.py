"""Atomic file writes: write to a temporary sibling, then ``os.replace`` it into place.

A crash or interrupt never leaves a half-written file under the final name, so "the file exists"
always means "the file is complete" and interrupted batch work can resume by skipping existing
outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so libraries that choose a
    format by extension still work. On error the temporary file is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files follow the umask
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work is done, an output path that cannot be written.

    Checks the suffix (one of ``suffixes`` when given, e.g. ``(".nii", ".nii.gz")``), that
    ``path`` is not a folder, and that its nearest existing ancestor is a writable folder (the
    missing ones are created later by :func:`atomic_path`). Nothing is created here.

    Raises:
        ValueError: the path, and what is wrong with it, in one line.
    """
    path = Path(path)
    if suffixes and not path.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise ValueError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file to write")
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot be created, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be created, {parent} is not writable")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (numpy scalars and arrays converted)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed ``.npz`` archive of named arrays."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def write_csv(path: str | os.PathLike, frame: "Any") -> None:
    """Atomically write a pandas DataFrame as CSV without the index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
