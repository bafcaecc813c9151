"""The batch form of the engine: :class:`cspine.engine.StudyEngine` mapped over many studies.

Shared by ``make crops`` (:mod:`cspine.train_crops`, stage-1 part over the train studies) and
``make submit`` (:mod:`cspine.submit`, the whole engine over the test studies):

* **loading** (:func:`iter_loaded`): each study's DICOM is decoded once, in ``jobs`` worker
  processes a few studies ahead of the networks (forkserver workers that never inherit torch's
  threads); a study already decoded in this run is read from the volume cache
  (:mod:`common.volume_cache`). With ``jobs`` 1 the study is loaded in this process, with
  :func:`common.dicom_io.load_series`'s own decode pool.
* **the networks** stay in this process, on the engine's device (a GPU keeps them there).
* **one bad study never stops the batch**: a load or engine failure becomes that study's QC
  row (``status failed``, reason code, one-line message) and the batch goes on.
* **skip what is done**: a study whose per-study record is current is not loaded at all.
* **beyond one machine** (:func:`parse_shard`): ``--shard i/N`` processes every N-th study
  starting at i and writes only the per-study records; a Slurm array (``SLURM_ARRAY_TASK_ID`` /
  ``SLURM_ARRAY_TASK_COUNT``) or ``torchrun`` (``RANK`` / ``WORLD_SIZE``) sets the shard by
  itself with ``--shard auto``. A run without ``--shard`` then finds every record current and
  only merges them (manifest, submission).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from common.geometry import Volume


@dataclass(frozen=True)
class StudyTask:
    """One study of a batch.

    Attributes:
        uid: StudyInstanceUID (the folder name).
        split: ``train``, ``test`` or ``validate``.
        study_dir: the DICOM folder, or a ``.nii``/``.nii.gz`` CT in HU ("" when the study
            has no images).
        fold: fold of the shared fold file (-1 for test studies).
    """

    uid: str
    split: str
    study_dir: str
    fold: int = -1


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/N"`` → (i, N); ``"auto"`` → from Slurm or torchrun variables (None when unset);
    None / ``""`` → None (every study).

    Raises:
        ValueError: malformed text or i outside 0..N-1.
    """
    if not text:
        return None
    if text == "auto":
        env = os.environ
        for index, count in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                             ("RANK", "WORLD_SIZE")):
            if env.get(index) and env.get(count):
                text = f"{env[index]}/{env[count]}"
                break
        else:
            return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4, or auto") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < N")
    return (i, n) if n > 1 else None


def select_shard(tasks: Sequence[StudyTask], shard: tuple[int, int] | None) -> list[StudyTask]:
    """The tasks of one shard (every N-th, in the given order)."""
    if shard is None:
        return list(tasks)
    i, n = shard
    return list(tasks[i::n])


def _load_task(task: StudyTask, lenient: bool, cache_dir: str | None, keep: bool,
               workers: int | None) -> tuple[Volume | None, str, dict[str, Any]]:
    """Load one study; never raises (a failure is returned as its QC fields)."""
    from common.volume_cache import load_study

    t0 = time.perf_counter()
    nifti = task.study_dir.endswith((".nii", ".nii.gz")) and os.path.isfile(task.study_dir)
    if not nifti and (not task.study_dir or not os.path.isdir(task.study_dir)):
        return None, "", {"status": "failed", "reason": "no_images",
                          "message": f"no image folder {task.study_dir or '(none)'}"}
    try:
        if nifti:  # a NIfTI CT (cspine validate's CSV form): read as `cspine predict` reads it
            from cspine.predict import load_input

            volume, source = load_input(task.study_dir), "decoded"
        else:
            volume, source = load_study(task.study_dir, lenient=lenient, cache_dir=cache_dir,
                                        keep=keep, workers=workers)
    except Exception as exc:  # noqa: BLE001 — one bad study never stops the batch
        message = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return None, "", {"status": "failed", "reason": getattr(exc, "reason",
                                                                 type(exc).__name__),
                          "message": message, "load_seconds": time.perf_counter() - t0}
    return volume, source, {"load_seconds": round(time.perf_counter() - t0, 3)}


def _context():
    """:func:`common.procs.worker_context` with the loader's modules preloaded."""
    from common.procs import worker_context

    return worker_context(["numpy", "pydicom", "common.volume_cache", "common.dicom_io"])


def iter_loaded(tasks: Iterable[StudyTask], lenient: bool = False,
                cache_dir: str | os.PathLike | None = None, keep: bool = False,
                jobs: int = 2) -> Iterator[tuple[StudyTask, Volume | None, str, dict[str, Any]]]:
    """Yield (task, volume or None, ``decoded``/``cache``, QC fields) in the order of ``tasks``.

    With ``jobs`` > 1, ``jobs`` worker processes each load one whole study (in-process decode)
    and up to ``jobs + 1`` studies are in flight ahead of the consumer.
    """
    tasks = list(tasks)
    cache = os.fspath(cache_dir) if cache_dir else None
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield (task, *_load_task(task, lenient, cache, keep, None))
        return
    from common.procs import pool_initializer
    init, initargs = pool_initializer()

    with ProcessPoolExecutor(max_workers=jobs, mp_context=_context(),
                             initializer=init, initargs=initargs) as pool:
        pending: deque[tuple[StudyTask, Future]] = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append((task, pool.submit(_load_task, task, lenient, cache, keep, 1)))
            if len(pending) > jobs:
                break
        while pending:
            task, fut = pending.popleft()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load_task, nxt, lenient, cache, keep, 1)))
            try:
                yield (task, *fut.result())
            except Exception as exc:  # noqa: BLE001 — a dead worker fails one study only
                yield task, None, "", {"status": "failed", "reason": type(exc).__name__,
                                       "message": str(exc).splitlines()[0] if str(exc)
                                       else repr(exc)}


def run_batch(tasks: Sequence[StudyTask], process: Callable[[StudyTask, Volume], dict[str, Any]],
              current: Callable[[StudyTask], dict[str, Any] | None],
              on_failure: Callable[[StudyTask, dict[str, Any]], dict[str, Any]],
              lenient: bool = False, cache_dir: str | os.PathLike | None = None,
              jobs: int = 2, desc: str = "studies", progress: bool = True
              ) -> list[dict[str, Any]]:
    """Map ``process`` over the tasks' loaded volumes; returns one QC row per task (in order).

    Args:
        tasks: the studies.
        process: runs the engine on one loaded study, writes its outputs, returns its QC row.
        current: the QC row of a study whose outputs are already current (it is not loaded),
            else None.
        on_failure: the QC row (and any fallback outputs) of a study that failed to load or
            to process, given its QC fields (status, reason, message).
        lenient, cache_dir, jobs: as :func:`iter_loaded` (volumes are only read from the cache).
        desc: progress-bar label.
    """
    from tqdm.auto import tqdm

    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        row = current(task)
        if row is None:
            todo.append(task)
        else:
            rows[task.uid] = {**row, "status": row.get("status", "ok"), "volume": "done",
                              "seconds": 0.0}
    bar = tqdm(total=len(todo), desc=desc, unit="study", disable=not progress)
    for task, volume, source, fields in iter_loaded(todo, lenient, cache_dir, False, jobs):
        t0 = time.perf_counter()
        if volume is None:
            row = {**on_failure(task, fields), "volume": source}
        else:
            try:
                row = {**process(task, volume), **fields, "volume": source}
            except Exception as exc:  # noqa: BLE001 — one bad study never stops the batch
                message = str(exc).splitlines()[0] if str(exc) else repr(exc)
                row = on_failure(task, {"status": "failed", "reason": getattr(
                    exc, "reason", type(exc).__name__), "message": message})
                row["volume"] = source
        row["seconds"] = round(time.perf_counter() - t0 + float(fields.get("load_seconds", 0)),
                               3)
        rows[task.uid] = row
        bar.update()
    bar.close()
    return [rows[t.uid] for t in tasks]
