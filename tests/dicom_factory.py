"""Write small synthetic DICOM CT series with pydicom, mirroring the sparse RSNA header.

The header follows the one public RSNA dump (RSNA_FACTS.md §4): Explicit VR Little Endian, file
meta written by pydicom, SOPInstanceUID ``<study>.1.<n>``, SeriesInstanceUID ``<study>.1``,
InstanceNumber = file number, signed int16 with RescaleIntercept -1024 and slope 1, and **no**
Modality, SliceLocation or FrameOfReferenceUID. Tests pass stored values and positions and
compare the loaded arrays and affines with what they wrote.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import DSfloat

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def as_uid(name: str) -> str:
    """``name`` if it is a valid UID, else a stable UID derived from it (tests use free names)."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", name) and len(name) <= 50:
        return name
    return "1.2.826.0.1.3680043.99." + str(int(hashlib.sha1(name.encode()).hexdigest()[:12], 16))


def axial_positions(n: int, step: float = 0.625, z_top: float = 0.0, x: float = -67.4,
                    y: float = -85.0) -> np.ndarray:
    """(n, 3) LPS positions of an axial stack listed top first (z falls as the index rises)."""
    z = z_top - step * np.arange(n)
    return np.stack([np.full(n, x), np.full(n, y), z], axis=1)


def make_header(stored: np.ndarray, ipp: Sequence[float], *, study_uid: str, number: int,
                series_uid: str | None = None, iop: Sequence[float] = AXIAL,
                pixel_spacing: Sequence[float] = (0.5, 0.5), thickness: float = 0.625,
                slope: float | None = 1.0, intercept: float | None = -1024.0,
                signed: bool = True, bits_stored: int = 16, padding: int | None = None
                ) -> Dataset:
    """An RSNA-like dataset for one slice of stored values ``stored`` (rows, cols).

    ``slope``/``intercept`` of None omit the rescale tags.
    """
    rows, cols = stored.shape
    study_uid = as_uid(study_uid)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PYDICOM 2.3.0"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or f"{study_uid}.1"
    ds.PatientName = ds.PatientID = study_uid.rsplit(".", 1)[-1]
    ds.ImageOrientationPatient = [DSfloat(float(v), auto_format=True) for v in iop]
    ds.PixelSpacing = [DSfloat(float(v), auto_format=True) for v in pixel_spacing]
    ds.SliceThickness = f"{thickness:g}"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if padding is not None:
        ds.PixelPaddingValue = int(padding)
        ds["PixelPaddingValue"].VR = "SS" if signed else "US"
    ds.WindowCenter, ds.WindowWidth = "500", "2000"
    _set_slice(ds, stored, ipp, number)
    return ds


def _set_slice(ds: Dataset, stored: np.ndarray, ipp: Sequence[float], number: int) -> None:
    uid = f"{ds.StudyInstanceUID}.1.{number}"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [DSfloat(float(v), auto_format=True) for v in ipp]
    dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    ds["PixelData"].VR = "OW"


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    if transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_slice(path: Path, stored: np.ndarray, ipp: Sequence[float], *,
                transfer_syntax: str = ExplicitVRLittleEndian, **header) -> Path:
    """Write one slice (see :func:`make_header` for the header keywords).

    ``transfer_syntax`` may be RLE Lossless (pydicom encodes it); other compressed syntaxes
    need an external encoder.
    """
    return _save(make_header(stored, ipp, **header), Path(path), transfer_syntax)


def write_series(folder: Path, stored: np.ndarray, positions: np.ndarray, *,
                 study_uid: str | None = None, file_numbers: Sequence[int] | None = None,
                 **header) -> list[Path]:
    """Write ``stored[i]`` (Z, rows, cols) at ``positions[i]`` as ``<file_numbers[i]>.dcm``.

    Args:
        folder: the study folder (created); its name is the default study UID.
        stored: stored values per file, in file order.
        positions: (Z, 3) ImagePositionPatient (LPS mm) per file.
        file_numbers: per file (default 1..Z).
        header: passed to :func:`write_slice` (iop, pixel_spacing, slope, intercept, ...).
    """
    folder = Path(folder)
    study_uid = study_uid or folder.name
    numbers = list(file_numbers) if file_numbers is not None else list(range(1, len(stored) + 1))
    ts = header.pop("transfer_syntax", ExplicitVRLittleEndian)
    if ts != ExplicitVRLittleEndian:
        return [write_slice(folder / f"{n}.dcm", stored[i], positions[i], study_uid=study_uid,
                            number=n, transfer_syntax=ts, **header)
                for i, n in enumerate(numbers)]
    folder.mkdir(parents=True, exist_ok=True)
    template = _Template(make_header(stored[0], positions[0], study_uid=study_uid,
                                     number=numbers[0], **header))
    paths = []
    for i, n in enumerate(numbers):
        path = folder / f"{n}.dcm"
        ds = template.ds
        _set_slice(ds, stored[i], positions[i], n)
        path.write_bytes(template.encode(ds))
        paths.append(path)
    return paths


_DYNAMIC = (0x00080018, 0x00200013, 0x00200032, 0x7FE00010)


def _encode_element(elem) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


class _Template:
    """Encodes the static header elements once with pydicom and only the per-slice ones
    (SOPInstanceUID, InstanceNumber, ImagePositionPatient, PixelData and the file meta's
    instance UID) per file: the same bytes pydicom writes, about 5× faster."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.static = [(int(e.tag), _encode_element(e)) for e in ds if int(e.tag) not in _DYNAMIC]
        self.meta_static = [(int(e.tag), _encode_element(e)) for e in ds.file_meta
                            if int(e.tag) not in (0x00020000, 0x00020003)]

    def encode(self, ds: Dataset) -> bytes:
        meta = sorted(self.meta_static + [
            (0x00020003, _encode_element(ds.file_meta["MediaStorageSOPInstanceUID"]))])
        body = b"".join(b for _, b in meta)
        group = DataElement(0x00020000, "UL", len(body))
        dynamic = [(t, _encode_element(ds[t])) for t in _DYNAMIC]
        data = b"".join(b for _, b in sorted(self.static + dynamic))
        return b"\0" * 128 + b"DICM" + _encode_element(group) + body + data


def ramp_stack(n: int, rows: int = 8, cols: int = 8, seed: int = 0) -> np.ndarray:
    """(n, rows, cols) int16 stored values, distinct per slice (value = 100·slice + noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 50, size=(n, rows, cols))
    return (base + 100 * np.arange(n)[:, None, None]).astype(np.int16)
