"""Signed-distance shapes of the synthetic vertebrae, in each vertebra's local frame.

Local coordinates ``u`` are an array (..., 3) in mm: ``u[..., 0]`` left–right (along RAS +x),
``u[..., 1]`` anterior (+) / posterior (−), ``u[..., 2]`` superior (+) / inferior (−), with the
origin at the centre of the vertebral body (for C1, which has no body, at the point on the
column axis where a body would be). Every function returns an approximate signed distance in mm,
positive inside, so that union = ``max``, intersection = ``min`` and difference
``min(a, -b)``. Sizes follow adult cervical anatomy (body height ~14–16 mm, width 16–22 mm,
depth ~15 mm; canal ~23 × 14 mm) times a per-study scale ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import geometry

BIG = 1e3


def ell_cyl(u: np.ndarray, cx: float, cy: float, a: float, b: float, z0: float, h: float
            ) -> np.ndarray:
    """Elliptic cylinder along the local S axis: half-axes (a, b), centre (cx, cy, z0), height h."""
    r = np.sqrt(((u[..., 0] - cx) / a) ** 2 + ((u[..., 1] - cy) / b) ** 2)
    return np.minimum((1.0 - r) * min(a, b), 0.5 * h - np.abs(u[..., 2] - z0))


def capsule(u: np.ndarray, p0: tuple[float, float, float], p1: tuple[float, float, float],
            radius: float) -> np.ndarray:
    """Rod of ``radius`` around the segment p0–p1 (rounded ends)."""
    a = np.asarray(p0, float)
    d = np.asarray(p1, float) - a
    rel = [u[..., i] - a[i] for i in range(3)]
    t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / float(d @ d), 0.0, 1.0)
    dist2 = sum((rel[i] - t * d[i]) ** 2 for i in range(3))
    return radius - np.sqrt(dist2)


def box(u: np.ndarray, centre: tuple[float, float, float], half: tuple[float, float, float]
        ) -> np.ndarray:
    """Axis-aligned box (in the local frame) with half-sizes ``half``."""
    return np.min(np.asarray(half, float) - np.abs(u - np.asarray(centre, float)), axis=-1)


@dataclass(frozen=True)
class VertebraShape:
    """Size parameters (mm) of one vertebra; ``kind`` picks the shape recipe.

    Attributes:
        name: "C1".."C7" or "T1".. .
        label: RSNA mask value (1–7 cervical, 8+ thoracic).
        kind: "atlas" (C1), "axis" (C2), "cervical" (C3–C7) or "thoracic".
        a, b, h: body half-width (left–right), half-depth (anterior–posterior), full height.
        canal_a, canal_b: half-axes of the spinal canal.
        spine_len, spine_r: length and radius of the spinous process.
        s: the study's anatomy scale factor.
    """

    name: str
    label: int
    kind: str
    a: float
    b: float
    h: float
    canal_a: float
    canal_b: float
    spine_len: float
    spine_r: float
    s: float

    @property
    def canal_y(self) -> float:
        """Anterior–posterior position of the canal centre (behind the body)."""
        return -(self.b + self.canal_b) if self.kind != "atlas" else -10.5 * self.s

    def bound(self) -> tuple[np.ndarray, np.ndarray]:
        """Local (lo, hi) corners of a box that contains the whole vertebra."""
        s = self.s
        lo = np.array([-36 * s, self.canal_y - self.canal_b - self.spine_len - 8 * s,
                       -0.5 * self.h - 0.8 * self.spine_len - 6 * s])
        hi = np.array([36 * s, self.b + 6 * s, 0.5 * self.h + 22 * s])
        return lo, hi


def make_shape(name: str, label: int, s: float, rng: np.random.Generator) -> VertebraShape:
    """Sizes of vertebra ``name`` for a study with scale ``s`` and ±4 % individual variation."""
    j = lambda: float(rng.uniform(0.96, 1.04))  # noqa: E731  (per-dimension jitter)
    if name == "C1":
        return VertebraShape(name, label, "atlas", 0.0, 0.0, 9.0 * s * j(), 14 * s * j(),
                             15 * s * j(), 6 * s, 2.5 * s, s)
    if name == "C2":
        return VertebraShape(name, label, "axis", 8.5 * s * j(), 8.0 * s * j(), 16 * s * j(),
                             12 * s * j(), 7.5 * s * j(), 20 * s * j(), 3.5 * s, s)
    if name.startswith("C"):
        lv = int(name[1:]) - 3
        spine = (26 if name == "C7" else 14 + 2 * lv) * s * j()
        return VertebraShape(name, label, "cervical", (8.0 + 0.7 * lv) * s * j(),
                             (7.5 + 0.3 * lv) * s * j(), (14.5 + 0.2 * lv) * s * j(),
                             11.5 * s * j(), 6.5 * s * j(), spine,
                             (3.2 if name == "C7" else 2.8) * s, s)
    lv = int(name[1:]) - 1
    return VertebraShape(name, label, "thoracic", (12.0 + 0.5 * lv) * s * j(),
                         (8.5 + 0.5 * lv) * s * j(), (16.5 + 0.6 * lv) * s * j(),
                         9.0 * s * j(), 7.0 * s * j(), 30 * s * j(), 3.5 * s, s)


def vertebra_sd(v: VertebraShape, u: np.ndarray) -> np.ndarray:
    """Signed distance (mm, > 0 inside) of the whole vertebra at local points ``u`` (..., 3)."""
    s = v.s
    if v.kind == "atlas":
        return _atlas(v, u)
    cy = v.canal_y
    parts = [ell_cyl(u, 0.0, 0.0, v.a, v.b, 0.0, v.h)]  # body
    # posterior arch: a ring around the canal (pedicles + laminae)
    arch_h = (10.0 if v.kind == "thoracic" else 8.5) * s
    outer = ell_cyl(u, 0.0, cy, v.canal_a + 4 * s, v.canal_b + 4 * s, 0.5 * s, arch_h)
    inner = ell_cyl(u, 0.0, cy, v.canal_a, v.canal_b, 0.0, BIG)
    parts.append(np.minimum(outer, -inner))
    # articular pillars (lateral masses), reaching towards the neighbours' facets
    pr = (4.0, 5.0) if v.kind == "thoracic" else (5.0, 6.0)
    for side in (-1.0, 1.0):
        parts.append(ell_cyl(u, side * (v.canal_a + 2.5 * s), cy + 1 * s, pr[0] * s, pr[1] * s,
                             0.0, v.h + 3 * s))
        if v.kind == "thoracic":  # long transverse processes, angled back
            parts.append(box(u, (side * (v.canal_a + 10 * s), cy - 2 * s, 0.0),
                             (8 * s, 3.5 * s, 3.5 * s)))
        else:  # short transverse processes beside the body
            parts.append(box(u, (side * (v.a + 5 * s), 1.0 * s, 0.0), (5 * s, 2.5 * s, 2.5 * s)))
    # spinous process, running back and down
    slope = 0.8 if v.kind == "thoracic" else 0.45
    back = cy - v.canal_b - 2 * s
    parts.append(capsule(u, (0.0, back, 0.5 * s),
                         (0.0, back - v.spine_len, -slope * v.spine_len), v.spine_r))
    if v.kind == "axis":  # the dens (odontoid process), rising into the ring of C1
        parts.append(capsule(u, (0.0, -1.5 * s, 0.5 * v.h - 3 * s),
                             (0.0, -1.5 * s, 0.5 * v.h + 12 * s), 5.0 * s))
    return np.max(np.stack(parts), axis=0)


def _atlas(v: VertebraShape, u: np.ndarray) -> np.ndarray:
    """C1: a ring (anterior + posterior arch) with two lateral masses and no body."""
    s, cy = v.s, v.canal_y
    outer = ell_cyl(u, 0.0, cy, v.canal_a + 5 * s, v.canal_b + 4.5 * s, 0.0, v.h)
    inner = ell_cyl(u, 0.0, cy, v.canal_a, v.canal_b, 0.0, BIG)
    parts = [np.minimum(outer, -inner)]
    for side in (-1.0, 1.0):
        parts.append(ell_cyl(u, side * 15 * s, -6 * s, 6 * s, 8.5 * s, 0.0, 13 * s))
        parts.append(box(u, (side * 25 * s, -6 * s, 0.0), (6 * s, 3.5 * s, 3 * s)))
    return np.max(np.stack(parts), axis=0)


def atlas_height_above_centre(v: VertebraShape) -> float:
    """How far (mm) the top of C1 lies above its local origin."""
    return max(0.5 * v.h, 6.5 * v.s)


def sd_gradient(v: VertebraShape, p: np.ndarray, eps: float = 0.25) -> np.ndarray:
    """Numerical gradient (3,) of :func:`vertebra_sd` at local point ``p`` (points inward)."""
    offs = np.eye(3) * eps
    pts = np.concatenate([p + offs, p - offs])
    d = vertebra_sd(v, pts)
    g = (d[:3] - d[3:]) / (2 * eps)
    n = np.linalg.norm(g)
    return g / n if n > 0 else np.array([0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- grid helpers
def box_of(affine: np.ndarray, shape: tuple[int, ...], lo_mm: np.ndarray, hi_mm: np.ndarray
           ) -> tuple[slice, ...] | None:
    """Voxel slices of the grid covering an RAS box, or None when the box misses the grid."""
    lo, hi = geometry.world_box_to_voxel_box(affine, lo_mm, hi_mm)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape) - 1)
    if np.any(hi < lo):
        return None
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


CHUNK_VOXELS = 1_000_000  # voxels per slab when painting (bounds memory on 512² grids)


def slabs(sl: tuple[slice, ...], chunk: int = CHUNK_VOXELS) -> list[tuple[slice, ...]]:
    """Split a voxel box into slabs of whole slices holding about ``chunk`` voxels each."""
    per_slice = (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)
    step = max(1, chunk // max(1, per_slice))
    return [(sl[0], sl[1], slice(z, min(z + step, sl[2].stop)))
            for z in range(sl[2].start, sl[2].stop, step)]


def grid_points(affine: np.ndarray, sl: tuple[slice, ...]) -> np.ndarray:
    """RAS mm (nx, ny, nz, 3) of the voxel centres in the box ``sl``."""
    idx = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1)
    return geometry.voxel_to_world(affine, idx)


def paint(hu: np.ndarray, sl: tuple[slice, ...], sd: np.ndarray, value: np.ndarray | float,
          vox: float) -> None:
    """Blend ``value`` into ``hu[sl]`` by partial volume: coverage 0.5 + sd/voxel, clipped."""
    frac = np.clip(0.5 + sd / vox, 0.0, 1.0)
    hu[sl] = hu[sl] * (1 - frac) + value * frac
