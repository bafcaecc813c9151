"""Write a rendered study as RSNA-style DICOM slices and an RSNA-style NIfTI mask.

DICOM (RSNA_FACTS.md §4): Explicit VR Little Endian (or JPEG Lossless SV1 encoded by GDCM), the
sparse tag set of the real files, signed int16 stored values with RescaleIntercept −1024,
InstanceNumber = file number. NIfTI (§5): the mask reoriented to LAS by
:func:`common.geometry.reorient` (stored shape (columns, rows, slices), qfac −1), qform code 2 and
sform code 1 with equal matrices, uint8 or uint16. Every file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1

from common import geometry
from common.atomic import atomic_path

IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
RESCALE_INTERCEPT = -1024
IMPLEMENTATION_VERSION = "PYDICOM 2.3.0"


def ds_str(value: float, decimals: int = 5) -> str:
    """A DICOM decimal string (≤ 16 characters) for ``value`` rounded to ``decimals``."""
    text = f"{round(float(value), decimals):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def slice_dataset(study_uid: str, n: int, position_lps: Sequence[float], pixel_spacing: float,
                  thickness: float, stored: np.ndarray,
                  extra: dict[str, str] | None = None) -> Dataset:
    """The header + pixels of file ``<n>.dcm`` (uncompressed).

    Args:
        study_uid: StudyInstanceUID (``1.2.826.0.1.3680043.<suffix>``).
        n: file number = InstanceNumber.
        position_lps: ImagePositionPatient (LPS mm).
        pixel_spacing: row = column spacing (mm).
        thickness: SliceThickness (mm).
        stored: int16 (Rows, Columns) stored values (HU − RescaleIntercept).
        extra: more header text by keyword (a site profile's Manufacturer, ConvolutionKernel,
            ContrastBolusAgent, PatientAge, PatientSex).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{study_uid}.1.{n}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = Dataset()
    ds.file_meta = meta
    suffix = study_uid.rsplit(".", 1)[-1]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = suffix
    ds.PatientID = suffix
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.1"
    ds.InstanceNumber = int(n)
    ds.ImagePositionPatient = [ds_str(v) for v in position_lps]
    ds.ImageOrientationPatient = [ds_str(v) for v in IOP]
    ds.SliceThickness = ds_str(thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.PixelSpacing = [ds_str(pixel_spacing, 6), ds_str(pixel_spacing, 6)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "500"
    ds.WindowWidth = "2000"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    return ds


def _jpeg_lossless_pixels(src: Path, dst: Path) -> bytes:
    """Encode the pixels of uncompressed ``src`` as JPEG Lossless SV1 with GDCM.

    Returns the encapsulated PixelData bytes. GDCM also stamps dates, Modality and other tags
    the real files lack, so only its pixel data is kept; the caller puts it into the
    pydicom-made header.
    """
    import gdcm  # heavy; only needed for compressed studies

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise OSError(f"{src}: GDCM could not read the uncompressed slice")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"{src}: GDCM could not encode JPEG Lossless")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"{dst}: GDCM could not write")
    encoded = pydicom.dcmread(dst)
    if encoded.file_meta.TransferSyntaxUID != JPEGLosslessSV1:
        raise OSError(f"{dst}: GDCM wrote {encoded.file_meta.TransferSyntaxUID}, not JPEG-LL SV1")
    return encoded.PixelData


def write_series(study_dir: Path, study_uid: str, hu: np.ndarray, affine: np.ndarray,
                 file_numbers: np.ndarray, pixel_spacing: float, thickness: float,
                 jpeg: bool, extra: dict[str, str] | None = None) -> None:
    """Write every sorted slice k of ``hu`` as ``<file_numbers[k]>.dcm``.

    Args:
        study_dir: the study folder (created).
        hu: int16 (X, Y, Z) HU; slice k is stored as (Rows, Columns) = (Y, X) by
            :func:`common.geometry.xyz_slice_to_pixels`.
        affine: the CT RAS affine; ImagePositionPatient comes from
            :func:`common.geometry.dicom_position_of_slice`.
        file_numbers: (Z,) file number of each sorted slice.
        jpeg: encode as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) instead of uncompressed.
        extra: more header text by keyword (:func:`slice_dataset`).
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[2]):
        n = int(file_numbers[k])
        pixels = geometry.xyz_slice_to_pixels(hu, k)  # (Rows, Columns) = (Y, X)
        stored = (pixels.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
        ds = slice_dataset(study_uid, n, geometry.dicom_position_of_slice(affine, k),
                           pixel_spacing, thickness, stored, extra)
        final = study_dir / f"{n}.dcm"
        with atomic_path(final, suffix=".dcm") as tmp:
            if jpeg:
                raw = tmp.with_name(tmp.name + ".raw.dcm")
                try:
                    ds.save_as(raw, enforce_file_format=True)
                    ds.PixelData = _jpeg_lossless_pixels(raw, tmp)
                finally:
                    if raw.exists():
                        os.unlink(raw)
                ds["PixelData"].VR = "OB"
                ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
            ds.save_as(tmp, enforce_file_format=True)
            os.chmod(tmp, 0o644)


def write_mask(path: Path, labels: np.ndarray, affine: np.ndarray, dtype: str) -> None:
    """Write the label map as RSNA stored it: LAS, qform code 2 = sform code 1, uncompressed.

    Args:
        path: ``segmentations/<UID>.nii``.
        labels: (X, Y, Z) on the CT grid (0, 1–7 = C1–C7, 8+ = T1..).
        affine: the CT RAS affine.
        dtype: "uint8" or "uint16".
    """
    stored, las_affine = geometry.reorient(labels, affine, "LAS")
    img = nib.Nifti1Image(stored.astype(dtype), las_affine)
    img.set_qform(las_affine, code=2)
    img.set_sform(las_affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii") as tmp:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
