"""Header-only scan of a study folder: which files are CT slices, their geometry and pixel format.

No pixel data is decoded here. Each file is read with ``pydicom.dcmread(stop_before_pixels=True)``
(about 0.5 ms per file); a short PixelData element is detected from the file size, so truncated
files are caught by the scan alone. Files are classified as:

* usable slices (a :class:`SliceHeader` each);
* skipped, with a reason (``not_dicom``, ``non_image``, ``no_geometry``, ``localizer``,
  ``multiframe``, ``not_grayscale``, ``not_ct`` (a Modality other than CT), and for entries that
  are not regular files ``not_a_file`` (a folder, a device), ``broken_link`` (a dangling or
  looping symbolic link), ``unreadable`` (an entry the operating system will not stat)): a
  warning, never an error by itself; every skipped file is named in the QC record and in any
  error the study then raises (e.g. a ``gap`` where a skipped slice was);
* corrupt, with a reason code: ``corrupt_file`` (a ``.dcm`` file pydicom cannot read, or a short
  PixelData element), ``bad_header`` (Rows, Columns, NumberOfFrames, BitsAllocated or the rescale
  not a number), ``implausible_size`` (Rows or Columns above :data:`MAX_SIDE`, refused before
  any allocation), ``pixel_size_mismatch`` (uncompressed PixelData far longer than the declared
  size, e.g. BitsAllocated 8 over 16-bit data), ``bad_geometry`` (PixelSpacing ≤ 0, an
  orientation that is not two orthogonal unit vectors, non-finite values). Any corrupt file
  rejects the study, in strict and lenient mode alike.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: Uncompressed transfer syntaxes (their PixelData length is known from the header).
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
           "1.2.840.10008.1.2.1.99"}


class SeriesError(ValueError):
    """A study folder that cannot be turned into a volume safely (strict-mode rejection).

    Attributes:
        study: the study folder name (StudyInstanceUID for RSNA).
        file: the file most directly involved (or ``""`` when the problem is the whole series).
        reason: a reason code from DICOM_PITFALLS.md §1 (``gap``, ``nonuniform_spacing``,
            ``duplicate_position``, ``gantry_tilt``, ``multiple_series``,
            ``inconsistent_geometry``, ``missing_codec``, ``corrupt_file``, ``no_rescale``,
            ``no_images``).
        evidence: the human-readable evidence.
        qc: the QC record up to the point of failure (status ``rejected``).
    """

    def __init__(self, study: str, file: str, reason: str, evidence: str,
                 qc: dict[str, Any] | None = None):
        where = f" (file {file})" if file else ""
        super().__init__(f"{study}: {reason}: {evidence}{where}")
        self.study = study
        self.file = file
        self.reason = reason
        self.evidence = evidence
        self.qc = qc if qc is not None else {}

    def __reduce__(self):  # picklable across process pools
        return (SeriesError, (self.study, self.file, self.reason, self.evidence, self.qc))


#: Largest Rows or Columns accepted (real CT slices are at most 1,024²): a header that declares
#: more is refused before any pixel buffer is allocated.
MAX_SIDE = 4096

#: Study-describing header fields kept for subgroup analyses (``cspine validate``): they never
#: change how a study is loaded. SliceThickness is kept as a number in ``thickness``.
DESCRIPTOR_TAGS = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
                   "ContrastBolusAgent", "PatientAge", "PatientSex", "KVP")


def _descriptors(ds: Any) -> tuple[tuple[str, str], ...]:
    """The :data:`DESCRIPTOR_TAGS` of a header as stripped text (multi-valued joined by '\\')."""
    out = []
    for tag in DESCRIPTOR_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # noqa: BLE001 - a malformed optional tag is simply absent
            continue
        if value is None:
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v).strip() for v in value)
        else:
            text = str(value).strip()
        if text:
            out.append((tag, text[:64]))
    return tuple(out)


@dataclass(frozen=True)
class SliceHeader:
    """What the loader needs from one CT slice header (values in DICOM units, LPS mm).

    ``file_number`` is the integer ``<n>`` of ``<n>.dcm`` (InstanceNumber when the name is not a
    number, -1 when neither exists); it is a key into ``train_bounding_boxes.csv``, never used
    for geometry.
    """

    path: str
    file_number: int
    series_uid: str
    iop: tuple[float, ...]
    ipp: tuple[float, float, float]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    thickness: float | None
    transfer_syntax: str
    slope: float
    intercept: float
    has_rescale: bool
    has_modality_lut: bool
    bits_stored: int
    pixel_representation: int
    padding: int | None
    padding_limit: int | None
    bits_allocated: int = 16
    pixel_offset: int = -1  # file offset of the PixelData element (uncompressed LE only)
    has_slope: bool = True
    has_intercept: bool = True
    #: (tag keyword, text) of the :data:`DESCRIPTOR_TAGS` present (non-empty) in the header
    descriptors: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class ScanResult:
    """The outcome of :func:`scan_folder`: usable slices, skipped files and corrupt files."""

    study: str
    slices: list[SliceHeader] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)
    files_seen: int = 0
    seconds: float = 0.0


def _file_number(path: Path, ds: Any) -> int:
    if re.fullmatch(r"\d+", path.stem):
        return int(path.stem)
    inst = ds.get("InstanceNumber")
    try:
        return int(inst) if inst not in (None, "") else -1
    except (TypeError, ValueError):
        return -1


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _looks_like_dicom(path: Path) -> bool:
    """For a file pydicom refuses: does it still look like DICOM (so it is corrupt, not foreign)?"""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return any(k in ds for k in ("SOPInstanceUID", "Rows", "ImagePositionPatient"))
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def read_header(path: Path) -> tuple[str, Any]:
    """Classify one file. Returns ``(kind, payload)``.

    ``kind`` is ``"slice"`` (payload: :class:`SliceHeader`), ``"skip"`` (payload: reason),
    or ``"corrupt"`` (payload: evidence).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_offset = fh.tell()
    except InvalidDicomError as exc:
        if _looks_like_dicom(path):
            return "corrupt", f"not readable as DICOM ({exc})"
        return "skip", "not_dicom"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken files
        if _looks_like_dicom(path):
            return "corrupt", f"header unreadable ({type(exc).__name__}: {exc})"
        return "skip", "not_dicom"
    try:
        return _interpret(path, ds, size, pixel_offset)
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
        # a value of the wrong type or form where a number or a list is needed
        return "corrupt", ("bad_header", f"unusable header value ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})")


def _interpret(path: Path, ds: Any, size: int, pixel_offset: int) -> tuple[str, Any]:
    """:func:`read_header` after the file was read: classify it and build its header."""

    if "Rows" not in ds or "Columns" not in ds:
        return "skip", "non_image"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "skip", "localizer"
    ints = {}
    for tag, default in (("Rows", None), ("Columns", None), ("NumberOfFrames", 1),
                         ("SamplesPerPixel", 1), ("BitsAllocated", 16)):
        value = ds.get(tag)
        try:
            ints[tag] = int(default if value in (None, "") and default is not None else value)
        except (TypeError, ValueError):
            return "corrupt", ("bad_header", f"{tag} {str(value)!r} is not an integer")
    if ints["NumberOfFrames"] > 1:
        return "skip", "multiframe"
    if ints["SamplesPerPixel"] != 1:
        return "skip", "not_grayscale"
    rows, cols, bits_alloc = ints["Rows"], ints["Columns"], ints["BitsAllocated"]
    if bits_alloc not in (8, 16, 32):
        return "corrupt", ("bad_header", f"BitsAllocated {bits_alloc} (expected 8, 16 or 32)")
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        return "corrupt", ("implausible_size", f"Rows x Columns {rows}x{cols} outside 1.."
                           f"{MAX_SIDE} (refused before allocating)")
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if iop is None or ipp is None or spacing is None:
        return "skip", "no_geometry"
    bad = _bad_geometry(iop, ipp, spacing)
    if bad:
        return "corrupt", ("bad_geometry", bad)

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        return "corrupt", "no TransferSyntaxUID in the file meta"
    remaining = size - pixel_offset
    if ts in _NATIVE:
        needed = rows * cols * bits_alloc // 8
        if remaining < needed:
            return "corrupt", (f"PixelData truncated: {remaining} bytes left for "
                               f"{rows}x{cols}x{bits_alloc // 8} = {needed}")
        if remaining > 1.5 * needed + 256:  # e.g. BitsAllocated 8 over 16-bit pixel data
            return "corrupt", ("pixel_size_mismatch", f"{remaining} bytes of PixelData for a "
                               f"declared {rows}x{cols}x{bits_alloc} bits = {needed} bytes")
    elif remaining < 16:
        return "corrupt", f"no compressed PixelData ({remaining} bytes after the header)"

    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality != "CT":  # after the structural checks: a broken file is corrupt
        return "skip", "not_ct"
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    try:
        float(ds.get("RescaleSlope") or 1.0)
        float(ds.get("RescaleIntercept") or 0.0)
    except (TypeError, ValueError):
        return "corrupt", ("bad_header", "RescaleSlope/RescaleIntercept is not a number")
    slope = float(ds.get("RescaleSlope") or 1.0) if "RescaleSlope" in ds else 1.0
    intercept = float(ds.get("RescaleIntercept") or 0.0) if "RescaleIntercept" in ds else 0.0
    pad = ds.get("PixelPaddingValue")
    pad_limit = ds.get("PixelPaddingRangeLimit")
    thickness = ds.get("SliceThickness")
    header = SliceHeader(
        path=str(path), file_number=_file_number(path, ds),
        series_uid=str(ds.get("SeriesInstanceUID", "")), iop=iop, ipp=ipp,  # type: ignore[arg-type]
        rows=rows, cols=cols, pixel_spacing=spacing,  # type: ignore[arg-type]
        thickness=float(thickness) if thickness not in (None, "") else None,
        transfer_syntax=ts, slope=slope, intercept=intercept, has_rescale=has_rescale,
        has_modality_lut="ModalityLUTSequence" in ds,
        bits_stored=int(ds.get("BitsStored") or bits_alloc),
        pixel_representation=int(ds.get("PixelRepresentation") or 0),
        padding=int(pad) if isinstance(pad, (int, float)) else None,
        padding_limit=int(pad_limit) if isinstance(pad_limit, (int, float)) else None,
        bits_allocated=bits_alloc,
        pixel_offset=pixel_offset if ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") else -1,
        has_slope="RescaleSlope" in ds, has_intercept="RescaleIntercept" in ds,
        descriptors=_descriptors(ds))
    return "slice", header


def _bad_geometry(iop: tuple[float, ...], ipp: tuple[float, ...], spacing: tuple[float, ...]
                  ) -> str:
    """Why a slice's geometry cannot be used ("" when it can)."""
    values = np.asarray([*iop, *ipp, *spacing], dtype=float)
    if not np.all(np.isfinite(values)):
        return f"non-finite geometry (IOP {list(iop)}, IPP {list(ipp)}, spacing {list(spacing)})"
    if min(spacing) <= 0:
        return f"PixelSpacing {list(spacing)} must be > 0"
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 \
            or abs(float(row @ col)) > 1e-2:
        return f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors"
    return ""


def _entries(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(sorted paths of the regular files in ``folder`` (symbolic links followed), the other
    entries as skipped records ``{"file", "reason"}``)."""
    paths, others = [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise SeriesError(folder.name, "", "unreadable",
                          f"cannot list {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        try:
            if entry.is_file():
                paths.append(entry.path)
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                reason = "broken_link"
            else:
                reason = "not_a_file"
        except OSError:  # e.g. a symbolic link loop, a name the system cannot stat
            reason = "broken_link" if os.path.islink(entry.path) else "unreadable"
        others.append({"file": entry.name, "reason": reason})
    return paths, others


def classify_files(paths: list[str]) -> list[tuple[str, Any]]:
    """:func:`read_header` for each path, in order (a picklable unit of work for a pool)."""
    return [read_header(Path(p)) for p in paths]


def scan_folder(study_dir: str | os.PathLike,
                map_chunks: Callable[[Callable, list[list[str]]], list] | None = None,
                chunk: int = 64) -> ScanResult:
    """Scan every regular file in ``study_dir`` (not recursive; hidden files count as seen).

    Args:
        study_dir: the study folder.
        map_chunks: optional ``map_chunks(fn, chunks) -> [fn(chunk), ...]`` (e.g. a process
            pool) used when there is more than one chunk of ``chunk`` files.

    Slices come back in file-name order; ordering by position is the validator's job.
    """
    import time

    t0 = time.perf_counter()
    folder = Path(study_dir)
    result = ScanResult(study=folder.name)
    if not folder.is_dir():
        raise SeriesError(folder.name, "", "no_images", f"{folder} is not a folder")
    paths, others = _entries(folder)
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if map_chunks is not None and len(chunks) > 1:
        parts = map_chunks(classify_files, chunks)
    else:
        parts = [classify_files(c) for c in chunks]
    result.files_seen = len(paths) + len(others)
    result.skipped.extend(others)
    for path, (kind, payload) in zip(paths, (r for part in parts for r in part)):
        name = os.path.basename(path)
        if kind == "slice":
            result.slices.append(payload)
        elif kind == "skip":
            result.skipped.append({"file": name, "reason": payload})
        else:
            reason, evidence = payload if isinstance(payload, tuple) else ("corrupt_file", payload)
            result.corrupt.append({"file": name, "reason": reason, "evidence": evidence})
    result.seconds = time.perf_counter() - t0
    return result
