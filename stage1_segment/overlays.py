"""Pictures of stage-1 results: validation overlays and crop sheets (matplotlib, Agg backend).

Slices are taken from (X, Y, Z) arrays without reordering the data: a sagittal view is
``a[x, :, :]`` shown with Z upwards (``origin="lower"``; for the axial RSNA series k grows
towards the head), an axial view is ``a[:, :, z]`` shown with Y downwards. ``aspect`` uses
the voxel size so millimetres look square.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from common.atomic import atomic_path  # noqa: E402
from common.labels import VERTEBRAE  # noqa: E402

#: One colour per class 1..8 (C1..C7, merged thoracic); class 0 is transparent.
LABEL_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
                 "#a9a9a9"]
_CMAP = ListedColormap(LABEL_COLOURS)


def _show_labels(ax, labels2d: np.ndarray, alpha: float = 0.45) -> None:
    masked = np.ma.masked_where(labels2d == 0, labels2d.astype(float) - 1)
    ax.imshow(masked, cmap=_CMAP, vmin=0, vmax=len(LABEL_COLOURS) - 1, alpha=alpha,
              interpolation="nearest", origin="lower")


def _centre(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    idx = np.argwhere(mask > 0)
    return idx.mean(axis=0).round().astype(int) if len(idx) else np.asarray(shape) // 2


def overlay_panel(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "") -> np.ndarray:
    """Sagittal and axial slices with true and predicted labels, as an RGB image.

    Args:
        image: float (X, Y, Z) windowed image (0..1) or HU.
        label: uint8 (X, Y, Z) true classes, or None (only the prediction is drawn).
        pred: uint8 (X, Y, Z) predicted classes.
        spacing: voxel size (X, Y, Z) in mm.
        title: figure title (e.g. the study UID).

    Returns:
        uint8 (H, W, 3) image.
    """
    ref = label if label is not None and label.any() else pred
    cx, _, cz = _centre(ref, image.shape)
    rows = [("true", label), ("predicted", pred)] if label is not None else [("predicted", pred)]
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 6.4), squeeze=False)
    sx, sy, sz = (float(s) for s in spacing)
    for col, (name, lab) in enumerate(rows):
        ax = axes[0, col]
        ax.imshow(image[cx].T, cmap="gray", origin="lower", aspect=sz / sy)
        _show_labels(ax, lab[cx].T)
        ax.set_title(f"{name}: sagittal x={cx}", fontsize=8)
        ax = axes[1, col]
        ax.imshow(image[:, :, cz].T, cmap="gray", origin="upper", aspect=sy / sx)
        masked = np.ma.masked_where(lab[:, :, cz].T == 0, lab[:, :, cz].T.astype(float) - 1)
        ax.imshow(masked, cmap=_CMAP, vmin=0, vmax=len(LABEL_COLOURS) - 1, alpha=0.45,
                  interpolation="nearest", origin="upper", aspect=sy / sx)
        ax.set_title(f"{name}: axial z={cz}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return _to_rgb(fig)


def _to_rgb(fig) -> np.ndarray:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    buf.seek(0)
    return (plt.imread(buf)[..., :3] * 255).astype(np.uint8)


def crops_sheet(crops: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None],
                out_path: str | Path, title: str = "") -> None:
    """Write a PNG with the mid-Z and mid-X slice of each vertebra crop, mask outlined.

    Args:
        crops: vertebra name → (image int16 HU (X, Y, Z), mask uint8 (X, Y, Z), affine) or None.
        out_path: PNG path (written atomically).
        title: figure title.
    """
    from common.geometry import spacing_of

    fig, axes = plt.subplots(2, len(VERTEBRAE), figsize=(2.0 * len(VERTEBRAE), 4.4))
    for col, name in enumerate(VERTEBRAE):
        top, bottom = axes[0, col], axes[1, col]
        item = crops.get(name)
        top.set_title(name, fontsize=10)
        if item is None:
            top.text(0.5, 0.5, "absent", ha="center", va="center")
        else:
            image, mask, affine = item
            sx, sy, sz = spacing_of(affine)
            own = mask == VERTEBRAE.index(name) + 1
            z, x = image.shape[2] // 2, image.shape[0] // 2
            top.imshow(np.clip(image[:, :, z].T, -400, 1500), cmap="gray", aspect=sy / sx)
            if own[:, :, z].any():
                top.contour(own[:, :, z].T.astype(float), levels=[0.5], colors="#ff3030",
                            linewidths=0.8)
            bottom.imshow(np.clip(image[x].T, -400, 1500), cmap="gray", origin="lower",
                          aspect=sz / sy)
            if own[x].any():
                bottom.contour(own[x].T.astype(float), levels=[0.5], colors="#ff3030",
                               linewidths=0.8)
        top.axis("off")
        bottom.axis("off")
    axes[0, 0].text(-0.15, 0.5, "axial\n(mid Z)", transform=axes[0, 0].transAxes,
                    ha="right", va="center", fontsize=8)
    axes[1, 0].text(-0.15, 0.5, "sagittal\n(mid X)", transform=axes[1, 0].transAxes,
                    ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stage1_segment.overlays MANIFEST OUT.png [--study UID]``: crop sheet of one study."""
    import argparse

    from common.manifest import read_manifest

    parser = argparse.ArgumentParser(prog="python -m stage1_segment.overlays",
                                     description="Draw the seven crops of one study (mid-slices, "
                                                 "own mask outlined) from a crop manifest.")
    parser.add_argument("manifest", help="WORK/stage1/crops/vertebrae.csv")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--study", help="StudyInstanceUID (default: first study with 7 crops)")
    args = parser.parse_args(argv)
    frame = read_manifest(args.manifest)
    if args.study is None:
        counts = frame[frame["present"]].groupby("study_uid").size()
        args.study = str(counts[counts == 7].index[0] if (counts == 7).any() else counts.idxmax())
    crops: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
    for row in frame[frame["study_uid"] == args.study].itertuples():
        if row.present:
            with np.load(row.crop_path) as z:
                crops[row.vertebra] = (z["image"], z["mask"], z["affine"])
        else:
            crops[row.vertebra] = None
    crops_sheet(crops, args.out, title=f"stage-1 crops of {args.study}")
    print(f"wrote {args.out} ({args.study})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
