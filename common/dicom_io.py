"""Read one study folder of DICOM slices into an HU :class:`~common.geometry.Volume`.

Pipeline (each step in its own module):

1. :mod:`common.dicom_scan` — header scan (``stop_before_pixels``); non-DICOM and non-image
   files are skipped and listed, unreadable or truncated ``.dcm`` files are ``corrupt_file``.
2. :mod:`common.series_validate` — one series, one geometry, duplicates, sorting by
   ImagePositionPatient projected on the slice normal (never by file name or InstanceNumber),
   the z step from the positions (never SliceThickness), gaps, uneven spacing, gantry tilt.
   **Strict by default**: any problem raises :class:`SeriesError` naming the study, the file,
   the reason code and the evidence. ``lenient=True`` repairs what is well defined and records
   every repair in ``volume.qc``.
3. :mod:`common.dicom_decode` — pixels → int16 HU per file (rescale per file, padding and
   values below -1024 → -1024), decoded by worker processes for large series.
4. :mod:`common.geometry` — the affine (voxel (X, Y, Z) → RAS mm); lenient resampling of tilted
   or unevenly spaced stacks onto an orthogonal grid.

Axis convention (see :mod:`common.geometry`): ``volume.hu`` is (X, Y, Z) = (DICOM column, DICOM
row, slice sorted ascending along the normal), int16 HU; ``volume.affine`` maps voxel indices to
RAS millimetres; ``volume.file_numbers[k]`` is the ``<n>`` of the file behind slice ``k`` (-1 for
slices synthesised by a repair).

The QC record (``volume.qc``, also ``SeriesError.qc``) has: study, status (ok / warned /
recovered / rejected), reasons, repairs, warnings, files_seen, files_used, files_skipped (each
with its reason), transfer_syntaxes (uid → count), decoder, shape, spacing, step_mm,
z_direction (how z runs as the file number rises), tilt_deg, max_drift_mm, hu_min, hu_max,
padding_fraction, workers and timings (seconds).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from common import decoders, geometry
from common.dicom_decode import DecodeError, DecodeItem, decode_stack, parallel_map
from common.dicom_scan import ScanResult, SeriesError, scan_folder
from common.geometry import Volume
from common.series_validate import SeriesPlan, plan_series, plan_summary

__all__ = ["SeriesError", "load_series", "scan_series", "decode_items"]

#: With an assumed rescale (lenient ``no_rescale``) the stored minimum must look like air in HU.
HU_AIR_MAX = -900


def _base_qc(scan: ScanResult, lenient: bool) -> dict[str, Any]:
    ts = Counter(h.transfer_syntax for h in scan.slices)
    return {
        "study": scan.study, "mode": "lenient" if lenient else "strict", "status": "ok",
        "reasons": [], "repairs": [], "warnings": [],
        "files_seen": scan.files_seen, "files_used": 0,
        "files_skipped": list(scan.skipped) + list(scan.corrupt),
        "transfer_syntaxes": dict(ts), "decoder": decoders.describe(list(ts)),
        "timings": {"scan_s": round(scan.seconds, 4)},
    }


def _reject(qc: dict[str, Any], err: SeriesError) -> SeriesError:
    qc["status"] = "rejected"
    if err.reason not in qc["reasons"]:
        qc["reasons"].append(err.reason)
    qc["error"] = str(err)
    err.qc = qc
    return err


def decode_items(plan: SeriesPlan) -> list[DecodeItem]:
    """One :class:`DecodeItem` per planned slice, with the decoder plugin chosen per syntax.

    Raises:
        decoders.MissingCodecError: a transfer syntax has no installed decoder.
    """
    return [DecodeItem(path=h.path, rows=h.rows, cols=h.cols,
                       plugin=decoders.choose_plugin(h.transfer_syntax),
                       slope=h.slope, intercept=h.intercept,
                       use_lut=h.has_modality_lut and not h.has_rescale,
                       padding=h.padding, padding_limit=h.padding_limit,
                       native=_native(h))
            for h in plan.slices]


def _native(h) -> tuple[int, bool, int, bool] | None:
    """The direct-read parameters of an uncompressed 16-bit little-endian slice, else None."""
    if h.pixel_offset < 0 or h.bits_allocated != 16 or not 0 < h.bits_stored <= 16:
        return None
    return (h.pixel_offset, h.transfer_syntax == "1.2.840.10008.1.2", h.bits_stored,
            h.pixel_representation == 1)


def load_series(study_dir: str | os.PathLike, lenient: bool = False,
                workers: int | None = None, min_slices: int | None = None) -> Volume:
    """Load a study folder of single-frame CT slices as an int16 HU volume with its affine.

    Args:
        study_dir: folder with the ``<n>.dcm`` files of one study (other files are skipped).
        lenient: repair duplicates, several stacks, gaps, uneven spacing and gantry tilt
            instead of rejecting (every repair is recorded in ``volume.qc``).
        workers: decoder processes (default min(2, CPU count)); series with fewer than 32
            slices are decoded in-process.
        min_slices: fewest slices accepted (default
            :data:`common.series_validate.MIN_SLICES`; 1 reads a single file on purpose).

    Returns:
        A :class:`~common.geometry.Volume`: ``hu`` int16 (X, Y, Z), ``affine`` float64 4×4
        voxel → RAS mm, ``file_numbers`` int64 (Z,), ``study_uid`` = folder name, ``qc``,
        ``source_files`` (the decoded files, in the sorted slice order).

    Raises:
        SeriesError: the folder cannot be read safely in this mode (``.reason`` is the code,
            ``.qc`` the QC record with status ``rejected``).
    """
    t0 = time.perf_counter()
    scan = scan_folder(study_dir, map_chunks=lambda fn, chunks: parallel_map(fn, chunks, workers))
    qc = _base_qc(scan, lenient)
    try:
        plan = plan_series(scan, lenient=lenient,
                           **({"min_slices": min_slices} if min_slices is not None else {}))
    except SeriesError as err:
        raise _reject(qc, err) from None
    qc.update(reasons=list(plan.reasons), repairs=list(plan.repairs),
              warnings=list(plan.warnings), files_used=len(plan.slices),
              files_skipped=plan.skipped + list(scan.corrupt))
    qc.update(plan_summary(plan))
    used_ts = Counter(h.transfer_syntax for h in plan.slices)
    qc["transfer_syntaxes"] = dict(used_ts)
    qc["decoder"] = decoders.describe(list(used_ts))
    try:
        items = decode_items(plan)
    except decoders.MissingCodecError as exc:
        raise _reject(qc, SeriesError(scan.study, plan.slices[0].name, "missing_codec",
                                      str(exc))) from None
    qc["timings"]["plan_s"] = round(time.perf_counter() - t0 - scan.seconds, 4)
    try:
        stack, stats = decode_stack(items, workers)
    except DecodeError as exc:
        raise _reject(qc, SeriesError(scan.study, os.path.basename(exc.path), exc.reason,
                                      str(exc))) from None
    qc["timings"]["decode_s"] = stats["seconds"]
    qc["workers"] = stats["workers"]
    if plan.assume_rescale and stats["raw_min"] > HU_AIR_MAX:
        raise _reject(qc, SeriesError(
            scan.study, "", "no_rescale", f"no rescale in the headers and the stored minimum "
            f"{stats['raw_min']} does not look like HU air (<= {HU_AIR_MAX})"))

    file_numbers = np.array([h.file_number for h in plan.slices], dtype=np.int64)
    hu = geometry.stack_to_xyz(stack)
    if plan.resample:
        t1 = time.perf_counter()
        hu, affine, source = geometry.resample_stack(
            hu, plan.positions, plan.iop, plan.pixel_spacing, plan.step_mm)
        file_numbers = np.where(source >= 0, file_numbers[np.maximum(source, 0)], -1)
        del stack
        qc["timings"]["resample_s"] = round(time.perf_counter() - t1, 4)
    else:
        affine = geometry.affine_from_dicom(plan.iop, plan.pixel_spacing, plan.positions[0],
                                            plan.step_mm)
    n_pixels = len(plan.slices) * plan.slices[0].rows * plan.slices[0].cols
    hu_min, hu_max = stats["hu_min"], stats["hu_max"]
    if plan.resample:  # interpolation stays within the data range; padding adds -1024
        hu_min = int(hu.min())
    qc.update(shape=list(hu.shape),
              spacing=[round(float(s), 6) for s in geometry.spacing_of(affine)],
              axcodes=geometry.axcodes(affine), hu_min=hu_min, hu_max=hu_max,
              padding_fraction=round(stats["n_padding"] / max(1, n_pixels), 6))
    if stats["hu_min"] > HU_AIR_MAX:
        qc["warnings"].append(f"minimum {stats['hu_min']} HU: no air in the volume "
                              "(check the rescale)")
    if stats["n_above"]:
        qc["warnings"].append(f"{stats['n_above']} voxels above 32767 HU clipped")
    if qc["repairs"]:
        qc["status"] = "recovered"
    elif qc["warnings"] or qc["files_skipped"]:
        qc["status"] = "warned"
    qc["timings"]["total_s"] = round(time.perf_counter() - t0, 4)
    return Volume(hu=hu, affine=affine, file_numbers=file_numbers, study_uid=scan.study, qc=qc,
                  source_files=tuple(h.path for h in plan.slices))


def scan_series(study_dir: str | os.PathLike) -> dict[str, Any]:
    """Header-only census of one study folder (no pixel decoding): one row for ``check-data``.

    The folder is validated in lenient mode so that every problem is listed, then classified:
    ``status`` is ``ok`` (strict loading succeeds), ``warned`` (succeeds with skipped files or
    dropped identical duplicates), ``recoverable`` (strict rejects, lenient repairs) or
    ``rejected`` (no mode can load it). ``reasons`` lists the problem codes (``;``-joined).
    """
    folder = Path(study_dir)
    row: dict[str, Any] = {"study": folder.name}
    try:
        scan = scan_folder(folder)
    except SeriesError as err:
        row.update(status="rejected", reasons=err.reason, error=str(err), n_files=0)
        return row
    ts = Counter(h.transfer_syntax for h in scan.slices)
    row.update(n_files=scan.files_seen, n_skipped=len(scan.skipped),
               transfer_syntaxes=";".join(f"{k}:{v}" for k, v in sorted(ts.items())),
               decoder=decoders.describe(list(ts)))
    sizes = Counter(f"{h.rows}x{h.cols}" for h in scan.slices)
    row["sizes"] = ";".join(f"{k}:{v}" for k, v in sorted(sizes.items()))
    try:
        plan = plan_series(scan, lenient=True)
    except SeriesError as err:
        row.update(status="rejected", reasons=err.reason, error=str(err))
        return row
    summary = plan_summary(plan)
    affine = geometry.affine_from_dicom(plan.iop, plan.pixel_spacing, plan.positions[0],
                                        plan.step_mm)
    missing = []
    for ts_uid in ts:
        try:
            decoders.choose_plugin(ts_uid)
        except decoders.MissingCodecError:
            missing.append(ts_uid)
    reasons = list(plan.reasons) + (["missing_codec"] if missing else [])
    status = ("rejected" if missing else "recoverable" if plan.reasons
              else "warned" if plan.warnings or plan.skipped else "ok")
    row.update(
        status=status, reasons=";".join(reasons), n_slices=summary["n_slices"],
        rows=summary["rows"], cols=summary["cols"],
        pixel_spacing=";".join(f"{x:g}" for x in summary["pixel_spacing"]),
        thickness=summary["thickness"], step_mm=summary["step_mm"],
        step_min=summary["steps"].get("min"), step_max=summary["steps"].get("max"),
        direction=geometry.axcodes(affine), z_direction=summary["z_direction"],
        tilt_deg=summary["tilt_deg"], max_drift_mm=summary["max_drift_mm"],
        first_file=summary["file_numbers"][0], last_file=summary["file_numbers"][1],
        skipped=";".join(f"{s['file']}:{s['reason']}" for s in plan.skipped[:20]),
        warnings=" | ".join(plan.warnings), repairs=" | ".join(plan.repairs))
    return row
