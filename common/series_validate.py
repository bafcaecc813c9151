"""Validate a scanned study folder and plan how to build one volume from it (no pixels decoded).

The checks and the lenient repairs follow DICOM_PITFALLS.md §1–§2:

| code | detected when | strict | lenient |
|---|---|---|---|
| ``corrupt_file`` | unreadable ``.dcm`` or short PixelData | reject | reject |
| ``no_images`` | no usable CT slice in the folder | reject | reject |
| ``multiple_series`` | more than one SeriesInstanceUID | reject | keep the series with most slices |
| ``inconsistent_geometry`` | IOP (tol 1e-4), Rows/Columns or PixelSpacing differ | reject | keep the largest consistent group (if unique) |
| ``no_rescale`` | no Rescale Slope/Intercept and no Modality LUT | reject | assume (1, 0), checked after decode |
| ``incomplete_rescale`` | a file has RescaleSlope without RescaleIntercept or the reverse | reject | take the missing value from the other files when they all agree on it; else reject |
| ``inconsistent_rescale`` | files of the series differ in (slope, intercept) | reject | drop the files that differ from a unique majority (recorded; the gap rules apply) |
| ``inconsistent_bits`` | files differ in BitsAllocated / BitsStored / PixelRepresentation | reject | drop the files that differ from a unique majority |
| ``too_few_slices`` | fewer than ``MIN_SLICES`` slices after the checks (no slice step to measure) | reject | reject |
| ``duplicate_position`` | two files at one position (within 1e-3 mm) | byte-identical: drop, warn; else reject | split into stacks by occurrence, keep the stack with the lowest file numbers |
| ``gap`` | a step > 1.5 × median and a whole multiple of it (missing slices) | reject | resample, gap filled with −1024 HU |
| ``nonuniform_spacing`` | any other step deviates > 1 % from the median | reject | resample to the median step (linear) |
| ``gantry_tilt`` | slice origins drift > 0.1 pixel off the normal | reject | resample onto an orthogonal grid |

Geometry (sorting, projections, drift) is computed only through :mod:`common.geometry`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from common import geometry
from common.dicom_scan import ScanResult, SeriesError, SliceHeader

#: Fewest slices a study may have (the slice step is measured, never taken from SliceThickness).
MIN_SLICES = 3
GAP_FACTOR = 1.5
SPACING_RTOL = 1e-2
IOP_TOL = 1e-4
DUPLICATE_TOL_MM = 1e-3
#: A stack is tilted when a slice origin lies this many pixels off slice 0's normal line.
TILT_TOL_PIXELS = 0.1


@dataclass
class SeriesPlan:
    """The slices to decode, in order, and what must be done to them.

    Attributes:
        slices: the headers of the slices to decode, sorted ascending along the slice normal.
        positions: (N, 3) float64 LPS ImagePositionPatient of ``slices``.
        step_mm: the median step along the normal (mm); 1.0 (or SliceThickness) for 1 slice.
        resample: True when lenient repairs need :func:`common.geometry.resample_stack`.
        reasons: problem codes found (in strict mode only warnings remain here).
        repairs: human-readable descriptions of lenient repairs.
        warnings: non-fatal notes (e.g. byte-identical duplicates dropped).
        skipped: files not used, each ``{"file", "reason"}``.
        assume_rescale: True when files lack a rescale and (1, 0) is assumed (lenient).
        tilt_deg, max_drift_mm, z_direction: geometry facts for the QC record.
    """

    slices: list[SliceHeader]
    positions: np.ndarray
    step_mm: float
    resample: bool = False
    reasons: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    assume_rescale: bool = False
    tilt_deg: float = 0.0
    max_drift_mm: float = 0.0
    z_direction: str = "single"
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def iop(self) -> tuple[float, ...]:
        return self.slices[0].iop

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return self.slices[0].pixel_spacing


def pixel_digest(path: str) -> str:
    """SHA-1 of a file's raw PixelData bytes (no decoding); used to compare duplicates."""
    import pydicom

    ds = pydicom.dcmread(path)
    return hashlib.sha1(bytes(ds.PixelData)).hexdigest()


def position_keys(positions_lps: np.ndarray, iop: tuple[float, ...],
                  tol_mm: float = DUPLICATE_TOL_MM) -> list[int]:
    """A position id per slice: slices within ``tol_mm`` (3D) of each other share one.

    Slices are walked in order along the normal, so near-identical positions (…24673 holds two
    files 4 µm apart) are grouped whatever their rounding.
    """
    order = geometry.sort_slices(positions_lps, iop)
    keys = [0] * len(order)
    current, ref = -1, None
    for i in order:
        if ref is None or np.linalg.norm(positions_lps[i] - ref) > tol_mm:
            current, ref = current + 1, positions_lps[i]
        keys[i] = current
    return keys


class _Validator:
    def __init__(self, scan: ScanResult, lenient: bool,
                 digest: Callable[[str], str] = pixel_digest):
        self.scan, self.study, self.lenient, self.digest = scan, scan.study, lenient, digest
        self.reasons: list[str] = []
        self.repairs: list[str] = []
        self.warnings: list[str] = []
        self.skipped: list[dict[str, str]] = list(scan.skipped)

    def fail(self, reason: str, evidence: str, file: str = "") -> SeriesError:
        """The rejection, naming the files skipped so far (a skipped slice is often the real
        cause of a gap or of too few slices)."""
        return SeriesError(self.study, file, reason, evidence + skipped_note(self.skipped))

    def drop(self, files: list[SliceHeader], reason: str) -> None:
        self.skipped.extend({"file": h.name, "reason": reason} for h in files)

    # -- grouping -------------------------------------------------------------------------
    def choose_series(self, slices: list[SliceHeader]) -> list[SliceHeader]:
        by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
        for h in slices:
            by_uid[h.series_uid].append(h)
        if len(by_uid) == 1:
            return slices
        listing = ", ".join(f"{uid or '<none>'} ({len(v)} files)" for uid, v in by_uid.items())
        if not self.lenient:
            raise self.fail("multiple_series", f"{len(by_uid)} series in one folder: {listing}")
        keep_uid = max(by_uid, key=lambda u: (len(by_uid[u]),
                                              -min(h.file_number for h in by_uid[u])))
        for uid, files in by_uid.items():
            if uid != keep_uid:
                self.drop(files, "other_series")
        self.reasons.append("multiple_series")
        self.repairs.append(f"kept series {keep_uid} ({len(by_uid[keep_uid])} files) of {listing}")
        return by_uid[keep_uid]

    def choose_geometry(self, slices: list[SliceHeader]) -> list[SliceHeader]:
        groups: list[list[SliceHeader]] = []  # greedy: same size and spacing, IOP within tol
        for h in slices:
            for g in groups:
                ref = g[0]
                if ((h.rows, h.cols) == (ref.rows, ref.cols)
                        and np.allclose(h.pixel_spacing, ref.pixel_spacing, rtol=0, atol=1e-6)
                        and np.max(np.abs(np.subtract(h.iop, ref.iop))) <= IOP_TOL):
                    g.append(h)
                    break
            else:
                groups.append([h])
        if len(groups) == 1:
            return slices
        desc = "; ".join(
            f"{len(v)} files {v[0].rows}x{v[0].cols} spacing {list(v[0].pixel_spacing)} "
            f"IOP {[round(x, 4) for x in v[0].iop]} (e.g. {v[0].name})" for v in groups)
        sizes = sorted((len(v) for v in groups), reverse=True)
        if not self.lenient or sizes[0] == sizes[1]:
            raise self.fail("inconsistent_geometry", f"mixed slice geometry: {desc}")
        best = max(groups, key=len)
        for files in groups:
            if files is not best:
                self.drop(files, "inconsistent_geometry")
        self.reasons.append("inconsistent_geometry")
        self.repairs.append(f"kept the largest consistent group ({len(best)} files) of: {desc}")
        return best

    def check_rescale(self, slices: list[SliceHeader]) -> bool:
        missing = [h for h in slices if not h.has_rescale and not h.has_modality_lut]
        if not missing:
            return False
        if not self.lenient:
            raise self.fail("no_rescale", f"{len(missing)} of {len(slices)} files have neither "
                            "RescaleSlope/RescaleIntercept nor a Modality LUT", missing[0].name)
        self.reasons.append("no_rescale")
        self.repairs.append(f"assumed slope 1, intercept 0 for {len(missing)} files "
                            "(accepted only if the stored values look like HU)")
        return True

    def _majority(self, slices: list[SliceHeader], key: Callable[[SliceHeader], Any],
                  reason: str, what: str) -> list[SliceHeader]:
        """Keep one value of ``key`` per series: strict rejects a mixture, lenient keeps a
        unique majority and drops (records) the other files."""
        counts = Counter(key(h) for h in slices)
        if len(counts) == 1:
            return slices
        (top, n_top), *rest = counts.most_common()
        odd = [h for h in slices if key(h) != top]
        desc = ", ".join(f"{value} in {n} files" for value, n in counts.most_common())
        if not self.lenient or rest[0][1] == n_top:
            raise self.fail(reason, f"files differ in {what}: {desc} (e.g. {odd[0].name})",
                            odd[0].name)
        self.drop(odd, reason)
        self.reasons.append(reason)
        self.repairs.append(f"dropped {len(odd)} files whose {what} differs from the other "
                            f"{n_top} ({desc}): " + ", ".join(h.name for h in odd[:5]))
        return [h for h in slices if key(h) == top]

    def check_bits(self, slices: list[SliceHeader]) -> list[SliceHeader]:
        return self._majority(slices, lambda h: (h.bits_allocated, h.bits_stored,
                                                 h.pixel_representation),
                              "inconsistent_bits", "(BitsAllocated, BitsStored, "
                              "PixelRepresentation)")

    def check_rescale_values(self, slices: list[SliceHeader]) -> list[SliceHeader]:
        """A file with only one of RescaleSlope / RescaleIntercept, and files whose rescale
        differs from the others, are never decoded as if nothing were wrong."""
        import dataclasses

        part = [h for h in slices if h.has_slope != h.has_intercept]
        if part:
            full = [h for h in slices if h.has_slope and h.has_intercept]
            values = {(h.slope, h.intercept) for h in full}
            what = (f"{len(part)} of {len(slices)} files have RescaleSlope or RescaleIntercept "
                    f"without the other (e.g. {part[0].name})")
            if not self.lenient or len(values) != 1:
                hint = "" if self.lenient else ("; --lenient takes it from the other files "
                                                "when they all agree")
                raise self.fail("incomplete_rescale", what + hint, part[0].name)
            slope, intercept = values.pop()
            part_ids = {id(h) for h in part}
            slices = [dataclasses.replace(h, slope=slope, intercept=intercept, has_slope=True,
                                          has_intercept=True) if id(h) in part_ids else h
                      for h in slices]
            self.reasons.append("incomplete_rescale")
            self.repairs.append(f"{what}: took slope {slope:g}, intercept {intercept:g} from the "
                                f"other {len(full)} files")
        with_rescale = [h for h in slices if h.has_rescale]
        if len({(h.slope, h.intercept) for h in with_rescale}) > 1:
            kept = self._majority(with_rescale, lambda h: (h.slope, h.intercept),
                                  "inconsistent_rescale", "(RescaleSlope, RescaleIntercept)")
            kept_ids = {id(h) for h in kept}
            slices = [h for h in slices if not h.has_rescale or id(h) in kept_ids]
        return slices

    # -- duplicates ----------------------------------------------------------------------
    def resolve_duplicates(self, slices: list[SliceHeader]) -> list[SliceHeader]:
        slices = sorted(slices, key=lambda h: (h.file_number, h.name))
        keys = position_keys(np.array([h.ipp for h in slices], dtype=float), slices[0].iop)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(keys):
            groups[k].append(i)
        dup_groups = [g for g in groups.values() if len(g) > 1]
        if not dup_groups:
            return slices
        slices_before = list(slices)
        identical_drop: list[int] = []
        conflicting: list[list[int]] = []
        for g in dup_groups:
            digests = {self.digest(slices[i].path) for i in g}
            if len(digests) == 1:
                identical_drop.extend(g[1:])
            else:
                conflicting.append(g)
        if identical_drop:
            self.warnings.append(f"dropped {len(identical_drop)} byte-identical duplicate files")
            self.drop([slices[i] for i in identical_drop], "duplicate_identical")
            gone = set(identical_drop)
            slices = [h for i, h in enumerate(slices) if i not in gone]
            keys = [k for i, k in enumerate(keys) if i not in gone]
        if not conflicting:
            return slices
        n_positions = len(set(keys))
        index_of = {id(h): i for i, h in enumerate(slices)}
        conflicting = [[index_of[id(slices_before[i])] for i in g] for g in conflicting]
        g = conflicting[0]
        evidence = (f"{len(slices)} files but only {n_positions} distinct slice positions; "
                    f"{len(conflicting)} positions hold different pixels, e.g. files "
                    f"{[slices[i].name for i in g]} at {list(slices[g[0]].ipp)}")
        if not self.lenient:
            raise self.fail("duplicate_position", evidence, slices[g[0]].name)
        # stack = how many times this position was seen before, in file-number order
        seen: Counter = Counter()
        stack_of = []
        for k in keys:
            stack_of.append(seen[k])
            seen[k] += 1
        n_stacks = max(stack_of) + 1
        keep = [h for h, st in zip(slices, stack_of) if st == 0]
        self.drop([h for h, st in zip(slices, stack_of) if st > 0], "duplicate_stack")
        self.reasons.append("duplicate_position")
        self.repairs.append(
            f"{evidence}; split into {n_stacks} stacks, kept the first ({len(keep)} files, "
            f"file numbers {keep[0].file_number}..{keep[-1].file_number})")
        return keep

    # -- spacing and tilt ----------------------------------------------------------------
    def check_spacing(self, plan: SeriesPlan) -> None:
        p, iop = plan.positions, plan.iop
        if len(p) < 2:
            return
        s = geometry.project_positions(p, iop)
        steps = np.diff(s)
        med = float(np.median(steps))
        plan.step_mm = med
        plan.steps = {"min": float(steps.min()), "median": med, "max": float(steps.max())}
        problems: list[tuple[str, str, str]] = []
        is_gap = geometry.missing_slice_gaps(steps, med, GAP_FACTOR)
        big = np.flatnonzero(is_gap)
        if big.size:
            k = int(big[np.argmax(steps[big])])
            problems.append(("gap", f"{big.size} gaps of missing slices, largest "
                             f"{steps[k]:.2f} mm between files {plan.slices[k].name} and "
                             f"{plan.slices[k + 1].name} (median step {med:.3f} mm)",
                             plan.slices[k + 1].name))
        regular = steps[~is_gap]
        dev = np.abs(regular - med) / med if regular.size else np.zeros(1)
        if dev.max() > SPACING_RTOL:
            k = int(np.flatnonzero(~is_gap)[np.argmax(dev)])
            problems.append(("nonuniform_spacing", f"steps along the normal range "
                             f"{regular.min():.3f}-{regular.max():.3f} mm (median {med:.3f}, "
                             f"tolerance {SPACING_RTOL:.0%}), e.g. {steps[k]:.3f} mm before "
                             f"{plan.slices[k + 1].name}", plan.slices[k + 1].name))
        drift = geometry.perpendicular_offsets(p, iop)
        plan.max_drift_mm = float(drift.max())
        plan.tilt_deg = geometry.tilt_angle_deg(p, iop)
        tol = TILT_TOL_PIXELS * min(plan.pixel_spacing)
        if plan.max_drift_mm > tol:
            k = int(np.argmax(drift))
            problems.append(("gantry_tilt", f"slice origins drift {plan.max_drift_mm:.2f} mm off "
                             f"the slice normal (tilt {plan.tilt_deg:.2f} deg, tolerance "
                             f"{tol:.3f} mm)", plan.slices[k].name))
        if not problems:
            return
        priority = ("gantry_tilt", "gap", "nonuniform_spacing")
        problems.sort(key=lambda pr: priority.index(pr[0]))
        if not self.lenient:
            code, evidence, file = problems[0]
            raise self.fail(code, evidence + "".join(f"; also {c}: {e}" for c, e, _ in
                                                     problems[1:]), file)
        plan.resample = True
        for code, evidence, _ in problems:
            self.reasons.append(code)
            self.repairs.append(f"{code}: {evidence}")
        self.repairs.append(f"resampled onto an orthogonal grid with {med:.4f} mm steps "
                            "(linear, gaps and borders filled with -1024 HU)"
                            + skipped_note(self.skipped))


def skipped_note(skipped: list[dict[str, str]], most: int = 5) -> str:
    """``"; skipped: 5.dcm (no_geometry), sub (not_a_file)"`` for an error message ("" if
    none)."""
    if not skipped:
        return ""
    names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:most])
    more = f" and {len(skipped) - most} more" if len(skipped) > most else ""
    return f"; {len(skipped)} file(s) skipped: {names}{more}"


def plan_series(scan: ScanResult, lenient: bool = False,
                digest: Callable[[str], str] = pixel_digest,
                min_slices: int = MIN_SLICES) -> SeriesPlan:
    """Validate a scan and return the decoding plan, or raise :class:`SeriesError`.

    Args:
        scan: the header scan of one study folder.
        lenient: repair what can be repaired (see the module table) instead of rejecting.
        digest: function returning a PixelData fingerprint for a path (for duplicates).
        min_slices: fewest usable slices (``too_few_slices`` below; 1 only for tests or tools
            that read single files on purpose).
    """
    v = _Validator(scan, lenient, digest)
    if scan.corrupt:
        c = scan.corrupt[0]
        raise v.fail(c.get("reason", "corrupt_file"),
                     f"{len(scan.corrupt)} unreadable file(s): {c['evidence']}", c["file"])
    if not scan.slices:
        raise v.fail("no_images", f"no usable CT slice among {scan.files_seen} files")
    slices = v.choose_series(scan.slices)
    slices = v.choose_geometry(slices)
    slices = v.check_bits(slices)
    assume = v.check_rescale(slices)
    slices = v.check_rescale_values(slices)
    if len(slices) < min_slices:
        raise v.fail("too_few_slices", f"{len(slices)} usable slice(s); a study needs at least "
                     f"{min_slices} (the slice step is measured between slices)",
                     slices[0].name if slices else "")
    direction = geometry.file_order_direction([h.file_number for h in slices],
                                              np.array([h.ipp for h in slices]))
    slices = v.resolve_duplicates(slices)
    positions = np.array([h.ipp for h in slices], dtype=float)
    order = geometry.sort_slices(positions, slices[0].iop)
    slices = [slices[i] for i in order]
    thickness = slices[0].thickness
    plan = SeriesPlan(slices=slices, positions=positions[order],
                      step_mm=float(thickness) if thickness else 1.0, assume_rescale=assume,
                      z_direction=direction)
    v.check_spacing(plan)
    plan.reasons, plan.repairs, plan.warnings, plan.skipped = (v.reasons, v.repairs,
                                                               v.warnings, v.skipped)
    return plan


def plan_summary(plan: SeriesPlan) -> dict[str, Any]:
    """The geometry facts of a plan as QC-record fields (JSON-serialisable)."""
    first = plan.slices[0]
    return {
        "n_slices": len(plan.slices),
        "rows": first.rows, "cols": first.cols,
        "pixel_spacing": [float(x) for x in first.pixel_spacing],
        "thickness": first.thickness,
        "step_mm": round(plan.step_mm, 6),
        "steps": {k: round(x, 6) for k, x in plan.steps.items()},
        "z_direction": plan.z_direction,
        "tilt_deg": round(plan.tilt_deg, 4),
        "max_drift_mm": round(plan.max_drift_mm, 4),
        "file_numbers": [min(h.file_number for h in plan.slices),
                         max(h.file_number for h in plan.slices)],
        "iop": [round(x, 6) for x in first.iop],
        # Manufacturer, ConvolutionKernel, ContrastBolusAgent, PatientAge, PatientSex … of the
        # first slice (common.dicom_scan.DESCRIPTOR_TAGS), for subgroup analyses
        "header": dict(getattr(first, "descriptors", ())),
    }
