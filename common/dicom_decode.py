"""Decode CT slices to int16 HU, in worker processes for large series.

Per file: pydicom decodes the stored values (honouring PixelRepresentation and BitsStored) with
the plugin from :mod:`common.decoders`; the modality transform is applied per file (Rescale
Slope/Intercept, or the Modality LUT, as ``pydicom.pixels.apply_modality_lut`` does); padding
(PixelPaddingValue, with PixelPaddingRangeLimit) and anything below -1024 HU become -1024; values
above 32767 are clipped (and counted). The result is int16, never a float copy of the volume.

Threads do not help (the decoders hold the GIL), so series of ``MIN_PARALLEL_SLICES`` slices or
more are decoded by a persistent pool of worker processes, in chunks of up to ``CHUNK`` slices.
The workers write int16 straight into one (Z, rows, cols) buffer backed by a file in /dev/shm
(unlinked as soon as they finish, so nothing is left behind); where /dev/shm is missing or too
small they return int16 slabs that the parent copies into a preallocated buffer instead.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    #: uncompressed little-endian 16-bit data: (offset of the PixelData element, implicit VR,
    #: BitsStored, signed); read straight from the file, else decoded by pydicom
    native: tuple[int, bool, int, bool] | None = None


class DecodeError(RuntimeError):
    """A slice could not be decoded; ``reason`` is ``corrupt_file`` or ``missing_codec``."""

    def __init__(self, path: str, reason: str, message: str):
        super().__init__(message)
        self.path, self.reason = path, reason


def default_workers() -> int:
    """min(2, CPU count), or 1 inside a daemonic process (e.g. a DataLoader or Pool worker),
    which may not start children."""
    if multiprocessing.current_process().daemon:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _effective(workers: int | None) -> int:
    if workers is None or multiprocessing.current_process().daemon:
        return default_workers()
    return max(1, int(workers))


def to_hu(stored: np.ndarray, item: DecodeItem, ds: Any = None,
          out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Stored values (rows, cols) → int16 HU with padding and the floor at -1024 applied.

    Args:
        stored: decoded stored values (any integer dtype).
        item: the slice's rescale and padding parameters.
        ds: the full dataset, needed only when ``item.use_lut`` (Modality LUT Sequence).
        out: optional int16 (rows, cols) array to write into (e.g. a slice of the volume).

    Returns:
        (int16 HU array (rows, cols), stats dict: raw_min (HU before padding and the floor),
        hu_min, hu_max, n_padding, n_below, n_above).
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
        hu = np.add(stored, np.int32(item.intercept), dtype=np.int32)
    else:
        hu = stored.astype(np.float32)
        hu *= np.float32(item.slope)
        hu += np.float32(item.intercept)
        hu = np.rint(hu, out=hu)
    lo_v, hi_v = int(hu.min()), int(hu.max())
    raw_min = lo_v
    n_pad = 0
    if pad is not None:
        n_pad = int(np.count_nonzero(pad))
        if n_pad:
            hu[pad] = AIR_HU
            lo_v, hi_v = int(hu.min()), int(hu.max())
    n_below = n_above = 0
    if lo_v < AIR_HU or hi_v > INT16_MAX:  # rare: only then pay for the extra passes
        n_below = int(np.count_nonzero(hu < AIR_HU))
        n_above = int(np.count_nonzero(hu > INT16_MAX))
        np.clip(hu, AIR_HU, INT16_MAX, out=hu)
        lo_v, hi_v = max(lo_v, AIR_HU), min(hi_v, INT16_MAX)
    if out is None:
        out = np.empty(stored.shape, dtype=np.int16)
    np.copyto(out, hu, casting="unsafe")
    stats = {"raw_min": raw_min, "hu_min": lo_v, "hu_max": hi_v, "n_padding": n_pad,
             "n_below": n_below, "n_above": n_above}
    return out, stats


def read_native(item: DecodeItem) -> np.ndarray | None:
    """Stored values of an uncompressed little-endian 16-bit slice, read at its known offset.

    Does what pydicom's native decoder does (``correct_unused_bits``: bits above BitsStored
    are cleared, or sign-extended when signed) without parsing the header a second time.
    Returns None when the element found there is not the expected PixelData (the caller then
    uses pydicom).
    """
    offset, implicit, bits_stored, signed = item.native  # type: ignore[misc]
    n = item.rows * item.cols
    with open(item.path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(8 if implicit else 12)
        if len(head) < (8 if implicit else 12) or head[:4] != b"\xe0\x7f\x10\x00":
            return None
        length = int.from_bytes(head[4:8] if implicit else head[8:12], "little")
        if length != 2 * n:
            return None
        arr = np.fromfile(fh, dtype="<i2" if signed else "<u2", count=n)
    if arr.size != n:
        return None
    arr = arr.reshape(item.rows, item.cols)
    if bits_stored < 16:
        shift = 16 - bits_stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def decode_one(item: DecodeItem, out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Decode one file to int16 HU (rows, cols), into ``out`` if given; raises DecodeError."""
    import pydicom
    from pydicom.pixels import pixel_array

    if item.native is not None and not item.use_lut:
        try:
            stored = read_native(item)
        except OSError as exc:
            raise DecodeError(item.path, "corrupt_file", f"cannot read pixels ({exc})") from exc
        if stored is not None:
            return to_hu(stored, item, None, out)
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
        if missing:
            raise DecodeError(item.path, "missing_codec",
                              f"cannot decode pixels ({_one_line(text)[:300]})") from exc
        raise DecodeError(item.path, "corrupt_file",
                          f"the compressed pixel data is damaged: no decoder could read it "
                          f"({_one_line(text)[:300]})") from exc
    if stored.shape != (item.rows, item.cols):
        raise DecodeError(item.path, "corrupt_file", f"decoded shape {stored.shape} != "
                          f"Rows x Columns {(item.rows, item.cols)}")
    return to_hu(stored, item, ds, out)


def _merge(total: dict, stats: dict) -> None:
    if not total:
        total.update(stats)
        return
    total["raw_min"] = min(total["raw_min"], stats["raw_min"])
    total["hu_min"] = min(total["hu_min"], stats["hu_min"])
    total["hu_max"] = max(total["hu_max"], stats["hu_max"])
    for k in ("n_padding", "n_below", "n_above"):
        total[k] += stats[k]


def _decode_chunk(items: Sequence[DecodeItem], target: tuple[str, tuple, int] | None = None
                  ) -> tuple[np.ndarray | None, dict, tuple | None]:
    """Worker entry: decode consecutive slices.

    With ``target = (path, shape, start)`` the slices are written into the shared int16 file
    mapping at ``path`` (rows ``start`` …) and no pixels travel back; otherwise they come back
    as one slab (n, rows, cols).
    """
    if target is not None:
        path, shape, start = target
        volume = np.memmap(path, dtype=np.int16, mode="r+", shape=shape)
        out = volume[start:start + len(items)]
    else:
        out = np.empty((len(items), items[0].rows, items[0].cols), dtype=np.int16)
    total: dict = {}
    try:
        for i, item in enumerate(items):
            try:
                _, stats = decode_one(item, out=out[i])
            except DecodeError as exc:
                return None, total, (exc.path, exc.reason, str(exc))
            _merge(total, stats)
    finally:
        if target is not None:
            del out, volume
    return (None if target is not None else out), total, None


def _shared_buffer(shape: tuple[int, ...]) -> tuple[np.ndarray, str] | None:
    """An int16 array backed by a file in /dev/shm (workers map the same pages), or None.

    Used only where /dev/shm exists with room to spare (it is 64 MB in default Docker
    containers); the caller unlinks the file once the workers are done, and the mapping
    lives on until the array is freed.
    """
    nbytes = int(np.prod(shape)) * 2
    shm = "/dev/shm"
    if not sys.platform.startswith("linux") or not os.path.isdir(shm):
        return None
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize < nbytes * 1.25 + (64 << 20):
            return None
        fd, path = tempfile.mkstemp(prefix="cspine-decode-", suffix=".i16", dir=shm)
    except OSError:
        return None
    try:
        os.ftruncate(fd, nbytes)
        return np.memmap(path, dtype=np.int16, mode="r+", shape=shape), path
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)


_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0


def _one_line(text: str) -> str:
    """A decoder's message on one line (pydicom lists each plugin's failure on its own line)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts)


def mp_context() -> multiprocessing.context.BaseContext:
    """:func:`common.procs.worker_context` with the decoder preloaded (forkserver on Linux: safe
    with threads in the parent, cheap after the first start)."""
    from common.procs import worker_context

    return worker_context(["numpy", "pydicom", "common.dicom_decode"])


def get_pool(workers: int) -> ProcessPoolExecutor:
    """The shared decode pool with ``workers`` processes (created once, reused across studies)."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        shutdown_pool()
        from common.procs import pool_initializer
        init, initargs = pool_initializer()

        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=mp_context(),
                                    initializer=init, initargs=initargs)
        _POOL_SIZE = workers
    return _POOL


def shutdown_pool() -> None:
    """Stop the decode pool's worker processes (also run at interpreter exit)."""
    global _POOL, _POOL_SIZE
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
    _POOL, _POOL_SIZE = None, 0


atexit.register(shutdown_pool)


def parallel_map(fn: Callable, chunks: list, workers: int | None = None) -> list:
    """``[fn(c) for c in chunks]`` computed by the shared worker pool (in order).

    Falls back to this process when ``workers`` is 1 or the pool breaks.
    """
    workers = _effective(workers)
    if workers > 1 and len(chunks) > 1:
        try:
            return list(get_pool(workers).map(fn, chunks))
        except BrokenProcessPool:
            shutdown_pool()
    return [fn(c) for c in chunks]


def decode_stack(items: Sequence[DecodeItem], workers: int | None = None
                 ) -> tuple[np.ndarray, dict]:
    """Decode slices into one int16 stack (Z, rows, cols), ``stack[k]`` from ``items[k]``.

    Args:
        items: the slices in their final (sorted) order; all of one size.
        workers: worker processes (default :func:`default_workers`); 1, or fewer than
            ``MIN_PARALLEL_SLICES`` slices, decodes in this process.

    Returns:
        (stack, stats) with stats: raw_min, hu_min, hu_max, n_padding, n_below, n_above,
        workers (processes actually used), seconds.

    Raises:
        DecodeError: the first file that failed, with its reason code.
    """
    t0 = time.perf_counter()
    workers = _effective(workers)
    n = len(items)
    shape = (n, items[0].rows, items[0].cols)
    total: dict = {}
    if workers > 1 and n >= MIN_PARALLEL_SLICES:
        try:
            stack = _parallel(items, shape, workers, total)
            total["workers"] = workers
        except BrokenProcessPool:
            shutdown_pool()
            total = {}
            stack = None
    else:
        stack = None
    if stack is None:
        stack = np.empty(shape, dtype=np.int16)
        _serial(items, stack, total)
        total["workers"] = 1
    total["seconds"] = round(time.perf_counter() - t0, 4)
    return stack, total


def _parallel(items: Sequence[DecodeItem], shape: tuple[int, int, int], workers: int,
              total: dict) -> np.ndarray:
    n = shape[0]
    chunk = max(4, min(CHUNK, math.ceil(n / (workers * 4))))
    shared = _shared_buffer(shape)
    stack = np.empty(shape, dtype=np.int16) if shared is None else shared[0]
    try:
        pool = get_pool(workers)
        futures = {}
        for s in range(0, n, chunk):
            target = None if shared is None else (shared[1], shape, s)
            futures[pool.submit(_decode_chunk, items[s:s + chunk], target)] = s
        for fut in as_completed(futures):
            slab, stats, error = fut.result()
            if error is not None:
                for f in futures:
                    f.cancel()
                raise DecodeError(*error)
            if slab is not None:
                s = futures[fut]
                stack[s:s + len(slab)] = slab
            _merge(total, stats)
    finally:
        if shared is not None:
            os.unlink(shared[1])  # the pages stay mapped in this process until freed
    return np.asarray(stack)


def _serial(items: Sequence[DecodeItem], stack: np.ndarray, total: dict) -> None:
    for k, item in enumerate(items):
        _, stats = decode_one(item, out=stack[k])
        _merge(total, stats)
