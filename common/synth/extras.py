"""Unlabelled bones around the column: skull base, hyoid, first ribs and clavicles.

They are bone by HU but carry no label, as in the real masks, so a segmenter has to learn the
vertebrae's shape and position instead of thresholding bone. All are placed relative to the
column (RAS mm) and drawn with the same cortex/cancellous blend as the vertebrae.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from common.synth.shapes import box_of, capsule, ell_cyl, grid_points, paint, slabs

if TYPE_CHECKING:
    from common.synth.phantom import Anatomy


def _paint_bone(hu: np.ndarray, affine: np.ndarray, anat: "Anatomy", sd_fn, centre: np.ndarray,
                rot: np.ndarray, extent: np.ndarray, vox: float, cortex_mm: float) -> None:
    """Evaluate ``sd_fn(local points)`` around ``centre`` (local axes ``rot``) and paint bone."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * extent
    world = corners @ rot.T + centre
    sl = box_of(affine, hu.shape, world.min(axis=0), world.max(axis=0))
    if sl is None:
        return
    for sub in slabs(sl):
        sd = sd_fn((grid_points(affine, sub) - centre) @ rot)
        core = np.clip((sd - cortex_mm) / vox + 0.5, 0.0, 1.0)
        value = anat.hu["cortex"] * 0.95 * (1 - core) + anat.hu["cancellous"] * core
        paint(hu, sub, sd, value, vox)


def paint_unlabelled_bones(hu: np.ndarray, affine: np.ndarray, anat: "Anatomy", vox: float,
                           cortex_mm: float) -> None:
    """Paint the skull base, the hyoid, the first two ribs and the clavicles into ``hu``."""
    s = anat.scale
    c1, c3 = anat.vertebrae[0], anat.vertebrae[2]
    world_axes = np.eye(3)

    # skull base: a bowl-shaped shell above C1 with the foramen magnum cut out; its lowest
    # point lies 1 mm above the top of C1 and nothing is drawn below 3 mm above it
    radii = np.array([60, 65, 45]) * s
    floor = anat.top_of_c1() + 1.0
    centre = np.array([c1.centre[0], c1.centre[1] - 20 * s, floor + radii[2]])

    def skull(u: np.ndarray) -> np.ndarray:
        outer = (1 - np.linalg.norm(u / radii, axis=-1)) * radii.min()
        inner = (1 - np.linalg.norm(u / (radii - 6 * s), axis=-1)) * (radii.min() - 6 * s)
        hole = ell_cyl(u, 0.0, 10 * s, 15 * s, 17 * s, 0.0, 1e3)
        cut = u[..., 2] - (floor + 2.0 - centre[2])
        return np.minimum(np.minimum(np.minimum(outer, -inner), -hole), cut)

    _paint_bone(hu, affine, anat, skull, centre, world_axes, radii, vox, cortex_mm)

    # hyoid: a U-shaped bar in front of the airway at the level of C3
    airway_y = c3.shape.b + 14 * s
    hy_centre = c3.centre + c3.rot @ np.array([0.0, airway_y - 2 * s, 3 * s])

    def hyoid(u: np.ndarray) -> np.ndarray:
        ring = np.minimum(ell_cyl(u, 0, 0, 14 * s, 13 * s, 0, 4 * s),
                          -ell_cyl(u, 0, 0, 11 * s, 10 * s, 0, 1e3))
        return np.minimum(ring, u[..., 1] + 2 * s)  # front half plus the start of the horns

    _paint_bone(hu, affine, anat, hyoid, hy_centre, c3.rot, np.array([16, 16, 4]) * s, vox,
                cortex_mm)

    # first ribs from the transverse processes of T1 and T2, curving forward and down
    for name in ("T1", "T2"):
        v = next(x for x in anat.vertebrae if x.shape.name == name)
        sh = v.shape
        for side in (-1.0, 1.0):
            pts = np.array([[side * (sh.canal_a + 14 * s), sh.canal_y - 2 * s, 0.0],
                            [side * 45 * s, sh.canal_y + 8 * s, -8 * s],
                            [side * 50 * s, 22 * s, -20 * s],
                            [side * 40 * s, 40 * s, -32 * s]])

            def rib(u: np.ndarray, pts: np.ndarray = pts) -> np.ndarray:
                return np.max(np.stack([capsule(u, tuple(a), tuple(b), 3.5 * s)
                                        for a, b in zip(pts[:-1], pts[1:])]), axis=0)

            _paint_bone(hu, affine, anat, rib, v.centre, v.rot, np.array([56, 56, 40]) * s, vox,
                        cortex_mm)

    # clavicles: from beside the sternal notch outwards, rising towards the shoulders
    t1 = next(x for x in anat.vertebrae if x.shape.name == "T1")
    for side in (-1.0, 1.0):
        a = (side * 14 * s, 34 * s, 0.0)
        b = (side * 62 * s, 6 * s, 12 * s)

        def clavicle(u: np.ndarray, a: tuple = a, b: tuple = b) -> np.ndarray:
            return capsule(u, a, b, 6 * s)

        _paint_bone(hu, affine, anat, clavicle, t1.centre, t1.rot, np.array([76, 42, 30]) * s,
                    vox, cortex_mm)
