"""The neck phantom: column layout, soft tissue, bone, discs and fractures on a CT grid.

All positions are RAS mm. The CT grid of a study is an axial stack built with
:func:`common.geometry.affine_from_dicom` (IOP (1,0,0,0,1,0)); arrays are (X, Y, Z) =
(DICOM column, DICOM row, slice sorted by ascending z). Voxel centres are mapped to mm only
through :func:`common.geometry.voxel_to_world`, so the phantom, the DICOM headers and the NIfTI
mask agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common import geometry
from common.synth.extras import paint_unlabelled_bones
from common.synth.shapes import (
    VertebraShape,
    atlas_height_above_centre,
    box_of,
    ell_cyl,
    grid_points,
    make_shape,
    paint,
    sd_gradient,
    slabs,
    vertebra_sd,
)

COLUMN = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3", "T4")


@dataclass
class PlacedVertebra:
    """A vertebra placed in the world: shape, body centre (RAS mm) and local axes."""

    shape: VertebraShape
    centre: np.ndarray
    rot: np.ndarray  # (3, 3): columns = local left–right, anterior, superior axes in RAS

    def local(self, xyz: np.ndarray) -> np.ndarray:
        """World points (..., 3) → local coordinates (..., 3)."""
        return (xyz - self.centre) @ self.rot

    def world_bound(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS box containing the vertebra."""
        lo, hi = self.shape.bound()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        w = corners @ self.rot.T + self.centre
        return w.min(axis=0), w.max(axis=0)


@dataclass
class Anatomy:
    """Everything drawn for one study except the fractures and the noise.

    Attributes:
        vertebrae: top to bottom, C1 first.
        hu: tissue values: soft, fat, cortex, cancellous, disc, crack (HU).
        neck: (half-width, half-depth, posterior offset of the neck centre) in mm.
        scale: anatomy scale factor.
    """

    vertebrae: list[PlacedVertebra]
    hu: dict[str, float]
    neck: tuple[float, float, float]
    scale: float
    airway: tuple[float, float] = (8.0, 7.0)

    def column_at(self, z: np.ndarray) -> np.ndarray:
        """Body-centre (x, y) of the column at heights ``z`` (mm), interpolated; (len(z), 2)."""
        c = np.array([v.centre for v in self.vertebrae])
        order = np.argsort(c[:, 2])
        return np.stack([np.interp(z, c[order, 2], c[order, d]) for d in (0, 1)], axis=1)

    def top_of_c1(self) -> float:
        c1 = self.vertebrae[0]
        return float(c1.centre[2] + atlas_height_above_centre(c1.shape))

    def bottom_of(self, name: str) -> float:
        v = next(v for v in self.vertebrae if v.shape.name == name)
        return float(v.centre[2] - 0.5 * v.shape.h)


def _rotation(slope_x: float, slope_y: float, twist: float) -> np.ndarray:
    """Local axes for a vertebra whose superior axis leans by (dx/dz, dy/dz) and twists."""
    si = np.array([slope_x, slope_y, 1.0])
    si /= np.linalg.norm(si)
    ap = np.array([0.0, 1.0, 0.0]) - si[1] * si
    ap /= np.linalg.norm(ap)
    lr = np.cross(ap, si)
    c, s = np.cos(twist), np.sin(twist)
    lr, ap = c * lr + s * ap, -s * lr + c * ap
    return np.stack([lr, ap, si], axis=1)


def sample_anatomy(rng: np.random.Generator, centre_xy: np.ndarray, c2_z: float,
                   scale: float) -> Anatomy:
    """Lay out C1..T4 along a randomly curved column (lordosis, lean, lateral bend).

    Args:
        rng: the study's anatomy generator.
        centre_xy: RAS (x, y) of the C2 body centre in mm.
        c2_z: RAS z of the C2 body centre in mm.
        scale: anatomy scale factor (1 = average adult).
    """
    s = scale
    shapes = [make_shape(n, i + 1, s, rng) for i, n in enumerate(COLUMN)]
    # arc length (downwards, from the C2 centre) of each body centre; C1's ring sits ~18 mm up
    arc = {"C2": 0.0, "C1": -18.0 * s * rng.uniform(0.95, 1.05)}
    for up, low in zip(shapes[1:-1], shapes[2:]):
        disc = (4.0 if low.kind == "thoracic" else 5.0) * s * rng.uniform(0.85, 1.15)
        arc[low.name] = arc[up.name] + 0.5 * up.h + disc + 0.5 * low.h
    length = arc["C7"] - arc["C1"]
    lordosis = rng.uniform(-2.0, 12.0) * s  # anterior bulge of the mid-cervical column (mm)
    lean = rng.uniform(-0.15, 0.15)  # dy/ds: forward or backward head posture
    bend = rng.uniform(-4.0, 4.0) * s  # lateral bow (mm)

    def offset(t: float) -> tuple[float, float, float, float]:
        q = (t - arc["C1"]) / length
        y = lordosis * 4 * q * (1 - q) + lean * (t - arc["C1"])
        x = bend * 4 * q * (1 - q)
        dy = lordosis * 4 * (1 - 2 * q) / length + lean
        dx = bend * 4 * (1 - 2 * q) / length
        return x, y, dx, dy

    x0, y0, _, _ = offset(0.0)
    placed = []
    for sh in shapes:
        t = arc[sh.name]
        x, y, dx, dy = offset(t)
        centre = np.array([centre_xy[0] + x - x0, centre_xy[1] + y - y0, c2_z - t])
        # moving down the arc, position changes by (dx, dy, -1): the superior axis is (-dx, -dy, 1)
        rot = _rotation(-dx + rng.normal(0, 0.03), -dy + rng.normal(0, 0.05),
                        rng.normal(0, 0.05))
        placed.append(PlacedVertebra(sh, centre, rot))
    hu = {"soft": rng.uniform(30, 60), "fat": rng.uniform(-110, -70),
          "cortex": rng.uniform(1000, 1400), "cancellous": rng.uniform(250, 400),
          "disc": rng.uniform(70, 100), "crack": rng.uniform(20, 90)}
    neck = (rng.uniform(52, 62) * s, rng.uniform(48, 56) * s, rng.uniform(8, 16) * s)
    return Anatomy(placed, hu, neck, s, airway=(rng.uniform(7, 9) * s, rng.uniform(6, 8) * s))


@dataclass
class Fracture:
    """One fracture: ``kind`` "crack" (low-density plane) or "fragment" (displaced piece)."""

    vertebra: str
    kind: str
    point: np.ndarray  # local mm
    normal: np.ndarray  # local unit vector
    radius: float  # mm: extent around ``point``
    width: float = 0.0  # crack width (mm)
    depth: float = 0.0  # fragment: how deep the cut plane lies below ``point`` (mm)
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3))  # fragment displacement


@dataclass
class Rendered:
    """A rendered study on its CT grid.

    Attributes:
        hu: int16 (X, Y, Z) Hounsfield units, noise included.
        labels: uint8 (X, Y, Z): 0 background, 1–7 C1–C7, 8+ T1.. (the vertebra's bone voxels).
        fracture_voxels: vertebra name → int (N, 3) voxel indices changed by its fracture.
        fractures: the fracture parameters.
    """

    hu: np.ndarray
    labels: np.ndarray
    fracture_voxels: dict[str, np.ndarray]
    fractures: list[Fracture]


def paint_soft_tissue(hu: np.ndarray, affine: np.ndarray, anat: Anatomy) -> None:
    """Air, then per slice the neck ellipse (fat rim, muscle) and the airway, in place."""
    nx, ny, nz = hu.shape
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    top, c7 = anat.top_of_c1(), anat.bottom_of("C7") + 12.0 * anat.scale  # shoulders start
    half_w, half_d, back = anat.neck
    for k in range(nz):
        pts = geometry.voxel_to_world(affine, np.stack([ii, jj, np.full_like(ii, k)], -1))
        z = float(pts[0, 0, 2])
        cx, cy = anat.column_at(np.array([z]))[0]
        grow_w = 1.0 + 0.004 * max(0.0, z - top) + min(0.8, 0.02 * max(0.0, c7 - z))
        grow_d = 1.0 + 0.006 * max(0.0, z - top) + min(0.3, 0.008 * max(0.0, c7 - z))
        r = np.sqrt(((pts[..., 0] - cx) / (half_w * grow_w)) ** 2
                    + ((pts[..., 1] - (cy - back)) / (half_d * grow_d)) ** 2)
        sl = hu[:, :, k]
        sl[:] = -1000.0
        sl[r < 1.0] = anat.hu["fat"]
        sl[r < 0.92] = anat.hu["soft"]
        if z < anat.vertebrae[1].centre[2]:  # airway below the level of C2
            c3 = anat.vertebrae[2].shape
            ay = cy + c3.b + 14 * anat.scale
            ra = ((pts[..., 0] - cx) / anat.airway[0]) ** 2 + ((pts[..., 1] - ay)
                                                               / anat.airway[1]) ** 2
            sl[ra < 1.0] = -1000.0


def paint_discs(hu: np.ndarray, affine: np.ndarray, anat: Anatomy, vox: float) -> None:
    """Intervertebral discs (unlabelled, ~80 HU) between consecutive bodies from C2–C3 down."""
    for up, low in zip(anat.vertebrae[1:-1], anat.vertebrae[2:]):
        top = low.centre + low.rot[:, 2] * 0.5 * low.shape.h
        bottom = up.centre - up.rot[:, 2] * 0.5 * up.shape.h
        centre = 0.5 * (top + bottom)
        gap = float(np.linalg.norm(bottom - top))
        a, b = min(up.shape.a, low.shape.a) * 0.95, min(up.shape.b, low.shape.b) * 0.95
        ext = np.array([a + 2, a + 2, gap + 4])
        sl = box_of(affine, hu.shape, centre - ext - 4, centre + ext + 4)
        if sl is None:
            continue
        rot = up.rot
        u = (grid_points(affine, sl) - centre) @ rot
        sd = ell_cyl(u, 0.0, 0.0, a, b, 0.0, gap + 2.0)
        paint(hu, sl, sd, anat.hu["disc"], vox)


def plan_fracture(v: PlacedVertebra, kind: str, rng: np.random.Generator,
                  min_width: float) -> Fracture:
    """Random crack or fragment through vertebra ``v`` (in its local frame).

    Args:
        min_width: smallest crack width / fragment displacement in mm (≈ 1.5 voxels), so the
            fracture is visible at the grid's resolution.
    """
    sh = v.shape
    lo, hi = sh.bound()
    # rejection-sample a point inside the bone (for fragments: near its surface)
    for _ in range(2000):
        p = rng.uniform(lo, hi)
        d = float(vertebra_sd(sh, p[None])[0])
        if (kind == "crack" and d > 0.5) or (kind == "fragment" and 0.2 < d < 2.5):
            break
    s = sh.s
    if kind == "crack":
        n = rng.normal(size=3)
        return Fracture(sh.name, kind, p, n / np.linalg.norm(n), rng.uniform(7, 12) * s,
                        width=max(rng.uniform(1.0, 2.0), min_width))
    outward = -sd_gradient(sh, p)
    n = outward + rng.normal(0, 0.3, size=3)
    n /= np.linalg.norm(n)
    tangent = rng.normal(0, 0.5, size=3)
    shift = n * max(rng.uniform(2.0, 4.0), min_width) + tangent
    return Fracture(sh.name, kind, p, n, rng.uniform(6, 10) * s,
                    depth=rng.uniform(3.0, 6.0) * s, shift=shift)


def _fragment_region(fr: Fracture, u: np.ndarray) -> np.ndarray:
    """Points of the fragment's source region: beyond the cut plane and near the point."""
    cut = fr.point - fr.normal * fr.depth
    return ((u - cut) @ fr.normal > 0) & (np.linalg.norm(u - fr.point, axis=-1) < fr.radius)


def paint_vertebra(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, v: PlacedVertebra,
                   anat: Anatomy, vox: float, cortex_mm: float, fracture: Fracture | None
                   ) -> np.ndarray | None:
    """Paint one vertebra's bone (cortex + cancellous core) and its label; apply its fracture.

    Voxels already labelled by a vertebra above keep that label (first writer wins where
    shapes touch). Returns the (N, 3) voxel indices changed by the fracture, or None.
    """
    lo, hi = v.world_bound()
    pad = 0.0 if fracture is None else float(np.linalg.norm(fracture.shift)) + 1.0
    sl = box_of(affine, hu.shape, lo - pad, hi + pad)
    if sl is None:
        return None
    # work in slabs of slices so a 512² × 0.6 mm study stays within a few hundred MB
    found = [np.zeros((0, 3), dtype=np.int64)]
    for sub in slabs(sl):
        found.append(_paint_slab(hu, labels, affine, sub, v, anat, vox, cortex_mm, fracture))
    return np.concatenate(found)


def _paint_slab(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, sl: tuple[slice, ...],
                v: PlacedVertebra, anat: Anatomy, vox: float, cortex_mm: float,
                fracture: Fracture | None) -> np.ndarray:
    """:func:`paint_vertebra` on the voxel box ``sl``; returns the fractured voxels (N, 3)."""
    u = v.local(grid_points(affine, sl))
    sd = vertebra_sd(v.shape, u)
    broken = None
    if fracture is not None and fracture.kind == "fragment":
        moved = u - fracture.shift
        src = _fragment_region(fracture, u)
        dst = _fragment_region(fracture, moved)
        sd_moved = vertebra_sd(v.shape, moved)
        broken = (src & (sd > 0)) | (dst & (sd_moved > 0))
        sd = np.maximum(np.where(src, -np.abs(sd) - 0.5 * vox, sd),
                        np.where(dst, sd_moved, -1e3))
    core = np.clip((sd - cortex_mm) / vox + 0.5, 0.0, 1.0)
    value = anat.hu["cortex"] * (1 - core) + anat.hu["cancellous"] * core
    paint(hu, sl, sd, value, vox)
    lab = labels[sl]
    mine = (sd > 0) & (lab == 0)
    lab[mine] = v.shape.label
    if fracture is not None and fracture.kind == "crack":
        rel = u - fracture.point
        broken = ((np.abs(rel @ fracture.normal) < 0.5 * fracture.width)
                  & (np.linalg.norm(rel, axis=-1) < fracture.radius) & mine)
        hu[sl][broken] = anat.hu["crack"]
    if broken is None or not broken.any():
        return np.zeros((0, 3), dtype=np.int64)
    return np.argwhere(broken) + np.array([s.start for s in sl])


def render(anat: Anatomy, affine: np.ndarray, shape: tuple[int, int, int],
           fractures: dict[str, str], frac_rng: np.random.Generator,
           noise_rng: np.random.Generator, noise_hu: float) -> Rendered:
    """Draw the study on the grid (``affine``, ``shape``), with fractures and noise.

    Args:
        fractures: vertebra name → "crack" | "fragment" for the positive vertebrae
            (empty for a negative study, or to render the intact phantom).
        frac_rng: generator for the fracture geometry.
        noise_rng: generator for the Gaussian noise (σ = ``noise_hu``), drawn slice by slice.
    """
    sp = geometry.spacing_of(affine)
    vox = float(np.mean(sp))
    min_width = 1.5 * float(np.max(sp))
    cortex_mm = max(1.2, 0.6 * float(np.max(sp)))
    hu = np.empty(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    paint_soft_tissue(hu, affine, anat)
    paint_unlabelled_bones(hu, affine, anat, vox, cortex_mm)
    paint_discs(hu, affine, anat, vox)
    planned = {v.shape.name: plan_fracture(v, fractures[v.shape.name], frac_rng, min_width)
               for v in anat.vertebrae if v.shape.name in fractures}
    changed: dict[str, np.ndarray] = {}
    for v in anat.vertebrae:
        fr = planned.get(v.shape.name)
        idx = paint_vertebra(hu, labels, affine, v, anat, vox, cortex_mm, fr)
        if fr is not None:
            changed[v.shape.name] = idx if idx is not None else np.zeros((0, 3), np.int64)
    out = np.empty(shape, dtype=np.int16)
    for k in range(shape[2]):
        noisy = hu[:, :, k] + noise_rng.normal(0.0, noise_hu, size=shape[:2]).astype(np.float32)
        out[:, :, k] = np.clip(np.rint(noisy), -1024, 3071)
    return Rendered(out, labels, changed, list(planned.values()))
