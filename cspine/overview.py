"""The overview PNG of one prediction: sagittal view with labelled vertebrae + flagged axials.

Left panel: the sagittal CT slice through the middle of the predicted cervical spine (bone
window), each predicted vertebra tinted in its own colour and labelled ``C3 0.82`` with its
fracture probability (red text when flagged, i.e. p ≥ threshold). Right panels: for each flagged
vertebra, the axial slice of highest suspicion (the crop slice of largest stage-2 class
activation, :func:`stage2_classify.cam.peak_slice_points`; the vertebra's centre slice when no
point is given) with the vertebra outlined.

With a heatmap (``cspine predict --cam``: the stage-2 CAMs of the flagged vertebrae on the CT
grid, :func:`stage2_classify.cam.cams_on_grid`) the map is drawn in colour (jet, transparent
below 30 % of its maximum, more opaque where higher) over the axial panels (that slice of the
map) and over the sagittal panel (its maximum over left–right, so a lateral crack shows too).

The CT is shown in an L, P, S axis order (:func:`common.geometry.reorient`, an exact
permutation), with pixel aspect from the voxel spacing: anterior is left, superior is up in the
sagittal panel; the patient's right is on the image left in the axial panels (radiological view).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from common import geometry
from common.geometry import Volume
from common.labels import OVERALL, VERTEBRAE

#: Display window (level, width) in HU.
BONE_DISPLAY = (400.0, 1800.0)
#: One colour per vertebra C1..C7 (matplotlib tab10 without red, which marks flagged labels).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = BONE_DISPLAY
    return np.clip((hu.astype(np.float32) - level + width / 2) / width, 0, 1)


def _tint(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """RGB image: grey CT with each label 1..7 blended in its colour."""
    from matplotlib.colors import to_rgb

    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for i, colour in enumerate(COLOURS, start=1):
        sel = labels == i
        if sel.any():
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(to_rgb(colour))
    return rgb


def render_overview(path: str | os.PathLike, volume: Volume, grid_mask: np.ndarray,
                    grid_affine: np.ndarray, probs: Mapping[str, float],
                    threshold: float, title: str = "",
                    axial_points: Mapping[str, np.ndarray] | None = None,
                    warning: str = "", heatmap: np.ndarray | None = None,
                    heatmap_label: str = "") -> None:
    """Write the overview PNG (atomically).

    Args:
        path: output ``.png``.
        volume: the CT (int16 HU (X, Y, Z) with its affine).
        grid_mask: uint8 (X', Y', Z') stage-1 classes on the model grid.
        grid_affine: the model grid's affine (voxel → RAS mm).
        probs: probability per target (C1..C7, patient_overall).
        threshold: flag vertebrae with p ≥ threshold.
        title: figure title (study name).
        warning: shown in red under the title (e.g. an implausible segmentation), if any.
        axial_points: per flagged vertebra, a world point (RAS mm) whose axial slice to show
            (the slice of highest stage-2 activation); vertebrae without one show their centre.
        heatmap: uint8 (X, Y, Z) on the CT grid (``volume.affine``), 0..255, or None.
        heatmap_label: what the map is (legend text).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_path

    # a view (no copy of the volume): only the drawn slices are read
    hu, affine = geometry.reorient(volume.hu, volume.affine, "LPS", contiguous=False)
    heat = geometry.reorient(heatmap, volume.affine, "LPS", contiguous=False)[0] \
        if heatmap is not None else None
    sx, sy, sz = geometry.spacing_of(affine)
    nx, ny, nz = hu.shape
    # positions come from the model-grid labels (small); only the drawn planes are mapped onto
    # the CT, by the same map-back as the full mask (common.geometry.labels_to_grid)
    centre = _centres(grid_mask, grid_affine, affine)
    present = [v for v in VERTEBRAE if v in centre]
    flagged = [v for v in present if probs.get(v, 0.0) >= threshold]
    spine = np.argwhere((grid_mask > 0) & (grid_mask <= len(VERTEBRAE)))
    if len(spine):
        world = geometry.voxel_to_world(grid_affine, np.median(spine, axis=0)[None])
        x_mid = int(np.clip(round(geometry.world_to_voxel(affine, world)[0, 0]), 0, nx - 1))
    else:
        x_mid = nx // 2

    n_ax = len(flagged)
    cols = min(3, n_ax)
    rows = max(1, -(-n_ax // 3))
    fig = plt.figure(figsize=(4.6 + 3.0 * cols, max(6.2, 3.5 * rows)))
    grid = fig.add_gridspec(rows, 1 + cols, width_ratios=[1.6] + [1.0] * cols)
    ax = fig.add_subplot(grid[:, 0])
    # sagittal plane at x = x_mid: rows = Z (superior up), columns = Y (anterior left).
    sag = _tint(_window(hu[x_mid]).T, _plane(grid_mask, grid_affine, affine, hu.shape, 0,
                                              x_mid).T)
    ax.imshow(sag, origin="lower", extent=(0, ny * sy, 0, nz * sz), interpolation="nearest")
    if heat is not None:
        ax.imshow(_heat_rgba(heat.max(axis=0).T), origin="lower", extent=(0, ny * sy, 0, nz * sz),
                  interpolation="nearest")
    centres = {v: (c[1] * sy, c[2] * sz) for v, c in centre.items()}
    for v, (y, z), z_text in zip(centres, centres.values(),
                                 _spread([c[1] for c in centres.values()], nz * sz * 0.055)):
        hot = v in flagged
        colour = "#d62728" if hot else COLOURS[VERTEBRAE.index(v)]
        text = v if warning else f"{v} {probs.get(v, float('nan')):.2f}"  # no prior as a score
        ax.annotate(text, xy=(y, z),
                    xytext=(ny * sy * 0.03, z_text), textcoords="data", va="center", fontsize=9,
                    color="white", fontweight="bold" if hot else "normal",
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.8},
                    bbox={"boxstyle": "round,pad=0.2", "alpha": 0.9, "linewidth": 0,
                          "facecolor": colour})
    missing = [v for v in VERTEBRAE if v not in present]
    overall = "withheld" if warning else f"{probs.get(OVERALL, float('nan')):.2f}"
    ax.set_title(f"sagittal (x={x_mid}); patient_overall {overall}"
                 + (f"\nnot found: {', '.join(missing)}" if missing else "")
                 + (f"\ncolour: {heatmap_label} map, max over left-right"
                    if heat is not None else ""), fontsize=9)
    ax.set_xlabel("anterior → posterior (mm)", fontsize=8)
    ax.set_ylabel("inferior → superior (mm)", fontsize=8)
    ax.tick_params(labelsize=7)

    for n, v in enumerate(flagged):
        ax = fig.add_subplot(grid[n // 3, 1 + n % 3])
        i = VERTEBRAE.index(v) + 1
        z, how = int(np.clip(round(centre[v][2]), 0, nz - 1)), "centre"
        if axial_points and v in axial_points:
            ijk = geometry.world_to_voxel(affine, np.asarray(axial_points[v])[None])[0]
            if 0 <= round(ijk[2]) < nz:
                z, how = int(round(ijk[2])), "max activation"
        # axial plane at z: rows = Y (anterior up), columns = X (patient right on the left).
        ax.imshow(_window(hu[:, :, z]).T, cmap="gray", origin="upper",
                  extent=(0, nx * sx, ny * sy, 0), interpolation="nearest")
        if heat is not None:
            ax.imshow(_heat_rgba(heat[:, :, z].T), origin="upper",
                      extent=(0, nx * sx, ny * sy, 0), interpolation="bilinear")
        ax.contour(np.arange(nx) * sx + sx / 2, np.arange(ny) * sy + sy / 2,
                   (_plane(grid_mask, grid_affine, affine, hu.shape, 2, z) == i).T.astype(float),
                   levels=[0.5], colors=["#d62728"],
                   linewidths=1.2)
        ax.set_title(f"{v} p={probs[v]:.2f}, axial z={z} ({how})", fontsize=9)
        ax.set_axis_off()
    if not flagged and not warning:
        fig.axes[0].text(0.5, -0.1, f"no vertebra with p ≥ {threshold:.2f}",
                         transform=fig.axes[0].transAxes, ha="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    bottom = 0.0
    if warning:
        import textwrap

        lines = textwrap.wrap(warning, max(40, int(fig.get_figwidth() * 15)))
        bottom = min(0.4, 0.03 + 0.2 * len(lines) / fig.get_figheight())
        fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", color="#d62728",
                 fontsize=8, weight="bold")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, pil_kwargs={"compress_level": 1})  # fast zlib level
    plt.close(fig)


def _heat_rgba(plane: np.ndarray) -> np.ndarray:
    """RGBA (rows, cols, 4) of a uint8 heatmap plane: jet colours, transparent below 30 % of
    the scale, alpha rising linearly to 0.75 at the maximum."""
    from matplotlib import colormaps

    v = np.asarray(plane, dtype=np.float32) / 255.0
    rgba = colormaps["jet"](v)
    rgba[..., 3] = np.clip((v - 0.3) / 0.7, 0.0, 1.0) * 0.75
    return rgba


def _centres(grid_mask: np.ndarray, grid_affine: np.ndarray, affine: np.ndarray
             ) -> dict[str, np.ndarray]:
    """Centroid of each vertebra present on the model grid, in voxel coordinates of ``affine``."""
    out = {}
    for i, v in enumerate(VERTEBRAE, start=1):
        pts = np.argwhere(grid_mask == i)
        if len(pts):
            world = geometry.voxel_to_world(grid_affine, pts.mean(axis=0)[None])
            out[v] = geometry.world_to_voxel(affine, world)[0]
    return out


def _plane(grid_mask: np.ndarray, grid_affine: np.ndarray, affine: np.ndarray,
           shape: tuple[int, ...], axis: int, index: int) -> np.ndarray:
    """The model-grid labels on one plane (``axis`` = ``index``) of the CT grid of ``affine``;
    a 2-D uint8 array of the other two axes."""
    start = [0, 0, 0]
    start[axis] = index
    plane_shape = list(shape)
    plane_shape[axis] = 1
    labels, _ = geometry.labels_to_grid(grid_mask, grid_affine,
                                        geometry.translate_affine(affine, start), plane_shape)
    return np.take(labels, 0, axis=axis)


def _spread(values: list[float], gap: float) -> list[float]:
    """Label positions near ``values`` but at least ``gap`` apart (same order as given)."""
    order = np.argsort(values)[::-1]
    out = np.asarray(values, dtype=float).copy()
    last = np.inf
    for k in order:
        out[k] = min(out[k], last - gap)
        last = out[k]
    shift = max(0.0, gap / 2 - out.min()) if len(out) else 0.0
    return list(out + shift)
