"""Decode CT slices to int16 HU, in worker processes for large series.

Per file: pydicom decodes the stored values (honouring PixelRepresentation and BitsStored) with
the plugin from :mod:`common.decoders`; the modality transform is applied per file (Rescale
Slope/Intercept, or the Modality LUT, as ``pydicom.pixels.apply_modality_lut`` does); padding
(PixelPaddingValue, with PixelPaddingRangeLimit) and anything below -1024 HU become -1024; values
above 32767 are clipped (and counted). The result is int16, never a float copy of the volume.

Threads do not help (the decoders hold the GIL), so series of ``MIN_PARALLEL_SLICES`` slices or
more are decoded by a persistent pool of worker processes that return int16 slabs of up to
``CHUNK`` slices; the parent copies each slab into one preallocated (Z, rows, cols) buffer.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

AIR_HU = -1024
INT16_MAX = 32767
MIN_PARALLEL_SLICES = 32
CHUNK = 32


@dataclass(frozen=True)
class DecodeItem:
    """One slice to decode: file, plugin and the per-file modality transform."""

    path: str
    rows: int
    cols: int
    plugin: str
    slope: float = 1.0
    intercept: float = 0.0
    use_lut: bool = False
    padding: int | None = None
    padding_limit: int | None = None


class DecodeError(RuntimeError):
    """A slice could not be decoded; ``reason`` is ``corrupt_file`` or ``missing_codec``."""

    def __init__(self, path: str, reason: str, message: str):
        super().__init__(message)
        self.path, self.reason = path, reason


def default_workers() -> int:
    """min(2, CPU count): decoding is CPU-bound and two processes already halve the time."""
    return max(1, min(2, os.cpu_count() or 1))


def to_hu(stored: np.ndarray, item: DecodeItem, ds: Any = None) -> tuple[np.ndarray, dict]:
    """Stored values (rows, cols) → int16 HU with padding and the floor at -1024 applied.

    Args:
        stored: decoded stored values (any integer dtype).
        item: the slice's rescale and padding parameters.
        ds: the full dataset, needed only when ``item.use_lut`` (Modality LUT Sequence).

    Returns:
        (int16 HU array (rows, cols), stats dict: stored_min, hu_min, hu_max, n_padding,
        n_below, n_above).
    """
    pad = None
    if item.padding is not None:
        lo, hi = item.padding, item.padding if item.padding_limit is None else item.padding_limit
        lo, hi = min(lo, hi), max(lo, hi)
        pad = (stored >= lo) & (stored <= hi) if lo != hi else stored == lo
    if item.use_lut:
        from pydicom.pixels import apply_modality_lut

        hu = np.rint(apply_modality_lut(stored, ds)).astype(np.int32)
    elif item.slope == 1.0 and float(item.intercept).is_integer():
        hu = stored.astype(np.int32)
        hu += int(item.intercept)
    else:
        hu = stored.astype(np.float32)
        hu *= np.float32(item.slope)
        hu += np.float32(item.intercept)
        hu = np.rint(hu, out=hu)
    n_pad = 0
    if pad is not None:
        n_pad = int(pad.sum())
        hu[pad] = AIR_HU
    n_below = int((hu < AIR_HU).sum())
    n_above = int((hu > INT16_MAX).sum())
    np.clip(hu, AIR_HU, INT16_MAX, out=hu)
    out = hu.astype(np.int16)
    stats = {"stored_min": int(stored.min()), "hu_min": int(out.min()), "hu_max": int(out.max()),
             "n_padding": n_pad, "n_below": n_below, "n_above": n_above}
    return out, stats


def decode_one(item: DecodeItem) -> tuple[np.ndarray, dict]:
    """Decode one file to int16 HU (rows, cols); raises :class:`DecodeError`."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        if item.use_lut:
            ds = pydicom.dcmread(item.path)
            stored = ds.pixel_array if not item.plugin else pixel_array(
                ds, decoding_plugin=item.plugin)
        else:
            ds = None
            stored = pixel_array(item.path, decoding_plugin=item.plugin)
    except Exception as exc:  # noqa: BLE001 - classify every decoder failure
        text = f"{type(exc).__name__}: {exc}"
        missing = "missing" in text.lower() and ("dependenc" in text.lower()
                                                   or "plugin" in text.lower())
        raise DecodeError(item.path, "missing_codec" if missing else "corrupt_file",
                          f"cannot decode pixels ({text[:300]})") from exc
    if stored.shape != (item.rows, item.cols):
        raise DecodeError(item.path, "corrupt_file", f"decoded shape {stored.shape} != "
                          f"Rows x Columns {(item.rows, item.cols)}")
    return to_hu(stored, item, ds)


def _merge(total: dict, stats: dict) -> None:
    if not total:
        total.update(stats)
        return
    total["stored_min"] = min(total["stored_min"], stats["stored_min"])
    total["hu_min"] = min(total["hu_min"], stats["hu_min"])
    total["hu_max"] = max(total["hu_max"], stats["hu_max"])
    for k in ("n_padding", "n_below", "n_above"):
        total[k] += stats[k]


def _decode_chunk(items: Sequence[DecodeItem]) -> tuple[np.ndarray | None, dict, tuple | None]:
    """Worker entry: decode consecutive slices into one int16 slab (n, rows, cols)."""
    out = np.empty((len(items), items[0].rows, items[0].cols), dtype=np.int16)
    total: dict = {}
    for i, item in enumerate(items):
        try:
            out[i], stats = decode_one(item)
        except DecodeError as exc:
            return None, total, (exc.path, exc.reason, str(exc))
        _merge(total, stats)
    return out, total, None


_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0


def _context() -> multiprocessing.context.BaseContext:
    """forkserver on Linux (safe with threads in the parent, cheap after the first start)."""
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "pydicom", "common.dicom_decode"])
        return ctx
    return multiprocessing.get_context("spawn")


def get_pool(workers: int) -> ProcessPoolExecutor:
    """The shared decode pool with ``workers`` processes (created once, reused across studies)."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        shutdown_pool()
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=_context())
        _POOL_SIZE = workers
    return _POOL


def shutdown_pool() -> None:
    """Stop the decode pool's worker processes (also run at interpreter exit)."""
    global _POOL, _POOL_SIZE
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
    _POOL, _POOL_SIZE = None, 0


atexit.register(shutdown_pool)


def decode_stack(items: Sequence[DecodeItem], workers: int | None = None
                 ) -> tuple[np.ndarray, dict]:
    """Decode slices into one int16 stack (Z, rows, cols), ``stack[k]`` from ``items[k]``.

    Args:
        items: the slices in their final (sorted) order; all of one size.
        workers: worker processes (default :func:`default_workers`); 1, or fewer than
            ``MIN_PARALLEL_SLICES`` slices, decodes in this process.

    Returns:
        (stack, stats) with stats: stored_min, hu_min, hu_max, n_padding, n_below, n_above,
        workers (processes actually used), seconds.

    Raises:
        DecodeError: the first file that failed, with its reason code.
    """
    t0 = time.perf_counter()
    workers = default_workers() if workers is None else max(1, int(workers))
    n = len(items)
    stack = np.empty((n, items[0].rows, items[0].cols), dtype=np.int16)
    total: dict = {}
    used = 1
    if workers > 1 and n >= MIN_PARALLEL_SLICES:
        chunk = max(4, min(CHUNK, math.ceil(n / (workers * 4))))
        starts = list(range(0, n, chunk))
        try:
            pool = get_pool(workers)
            futures = {pool.submit(_decode_chunk, items[s:s + chunk]): s for s in starts}
            for fut in as_completed(futures):
                slab, stats, error = fut.result()
                if error is not None:
                    for f in futures:
                        f.cancel()
                    raise DecodeError(*error)
                s = futures[fut]
                stack[s:s + len(slab)] = slab
                _merge(total, stats)
            used = workers
        except BrokenProcessPool:
            shutdown_pool()
            total, used = {}, 1
            _serial(items, stack, total)
    else:
        _serial(items, stack, total)
    total["workers"] = used
    total["seconds"] = round(time.perf_counter() - t0, 4)
    return stack, total


def _serial(items: Sequence[DecodeItem], stack: np.ndarray, total: dict) -> None:
    for k, item in enumerate(items):
        stack[k], stats = decode_one(item)
        _merge(total, stats)
