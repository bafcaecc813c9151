"""Label registry: the single place where vertebra names meet mask integers.

Outside mask arrays, vertebrae are always the strings ``"C1"`` … ``"C7"`` and the study-level
target is ``"patient_overall"``. Mask integers follow the RSNA segmentation convention:
0 = background, 1–7 = C1–C7, 8–19 = T1–T12.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
OVERALL = "patient_overall"
TARGETS: tuple[str, ...] = VERTEBRAE + (OVERALL,)
THORACIC: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13))

#: RSNA mask value for each named vertebra.
RSNA_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(VERTEBRAE + THORACIC)}
#: Our model's class index for each cervical vertebra (0 is background).
CLASS_INDEX: dict[str, int] = {name: i + 1 for i, name in enumerate(VERTEBRAE)}
THORACIC_CLASS = 8  # used only with thoracic="merge"

#: Train-set prevalence per target column (RSNA_FACTS.md §3.1, 2019 studies); the fallback prior.
PREVALENCE: dict[str, float] = {
    "C1": 146 / 2019, "C2": 285 / 2019, "C3": 73 / 2019, "C4": 108 / 2019,
    "C5": 162 / 2019, "C6": 277 / 2019, "C7": 393 / 2019, OVERALL: 961 / 2019,
}

ThoracicMode = Literal["background", "merge"]


class UnexpectedLabelError(ValueError):
    """A mask holds values outside the declared RSNA schema {0, 1–19}."""


def num_classes(thoracic: ThoracicMode = "background") -> int:
    """Number of output classes including background: 8 (C1–C7 + bg) or 9 with merged thoracic."""
    return 9 if thoracic == "merge" else 8


def remap_rsna_mask(mask: np.ndarray, thoracic: ThoracicMode = "background",
                    where: str = "mask") -> np.ndarray:
    """Map an RSNA label array to model classes.

    Args:
        mask: integer array of any shape and any integer dtype, values in {0, 1..19}.
        thoracic: ``"background"`` maps T1–T12 (8–19) to 0; ``"merge"`` maps them to class 8.
        where: a name for error messages (study UID or file path).

    Returns:
        uint8 array of the same shape: 0 = background, 1–7 = C1–C7, 8 = thoracic (merge only).

    Raises:
        UnexpectedLabelError: non-integer values or values outside 0–19, listing them.
    """
    if not np.issubdtype(mask.dtype, np.integer):
        rounded = np.rint(mask)
        if not np.array_equal(rounded, mask):
            raise UnexpectedLabelError(f"{where}: unexpected_label: non-integer mask values")
        mask = rounded.astype(np.int32)
    values = np.unique(mask)
    bad = values[(values < 0) | (values > 19)]
    if bad.size:
        raise UnexpectedLabelError(
            f"{where}: unexpected_label: values {bad.tolist()[:10]} outside the RSNA schema 0-19")
    lut = np.zeros(20, dtype=np.uint8)
    lut[1:8] = np.arange(1, 8)
    if thoracic == "merge":
        lut[8:20] = THORACIC_CLASS
    return lut[mask]

