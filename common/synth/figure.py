"""README figure: a sagittal and an axial slice of one synthetic study, mask and crack shown.

The study is read back exactly as a user's data would be: DICOM through
:func:`common.dicom_io.load_series`, the mask through :func:`common.nifti_io.align_mask`, and
the axial slice is the one of the largest box in ``train_bounding_boxes.csv`` of a study with a
crack. Display orientations come from :func:`common.geometry.reorient`: the sagittal view has
superior up and anterior left, the axial view is radiological (anterior up, patient right on
the left).

    python -m common.synth.figure DATA_DIR docs/images/synth_example.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common import geometry
from common.labels import VERTEBRAE

COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]


def pick_study(data_dir: Path) -> tuple[str, int]:
    """(uid, file number): the largest box of a train study with a crack, a mask and boxes."""
    studies = pd.read_csv(data_dir / "_synth_truth" / "studies.csv")
    boxes = pd.read_csv(data_dir / "train_bounding_boxes.csv")
    ok = studies[(studies["split"] == "train") & studies["mask"].notna()
                 & (studies["boxes"] > 0) & studies["fractures"].astype(str).str.contains("crack")]
    if ok.empty:
        raise ValueError(f"{data_dir}: no train study with a crack, a mask and boxes")
    b = boxes[boxes["StudyInstanceUID"].isin(ok["StudyInstanceUID"])]
    best = b.loc[(b["width"] * b["height"]).idxmax()]
    return str(best["StudyInstanceUID"]), int(best["slice_number"])


def make_figure(data_dir: str | Path, out_png: str | Path, uid: str | None = None,
                slice_number: int | None = None) -> str:
    """Draw the figure for ``uid`` (default: :func:`pick_study`) into ``out_png``; returns uid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from common.atomic import atomic_path
    from common.dicom_io import load_series
    from common.nifti_io import align_mask

    data_dir = Path(data_dir)
    if uid is None:
        uid, slice_number = pick_study(data_dir)
    vol = load_series(data_dir / "train_images" / uid)
    mask, _ = align_mask(vol, data_dir / "segmentations" / f"{uid}.nii")
    k = int(np.flatnonzero(vol.file_numbers == slice_number)[0]) if slice_number else \
        int(np.median(np.argwhere(mask > 0)[:, 2]))
    box = None
    if slice_number is not None:
        rows = pd.read_csv(data_dir / "train_bounding_boxes.csv")
        rows = rows[(rows["StudyInstanceUID"] == uid) & (rows["slice_number"] == slice_number)]
        if len(rows):
            box = rows.iloc[int((rows["width"] * rows["height"]).argmax())]

    # sagittal plane through the column centre; axes (I, P, L): [:, :, i] is superior-up,
    # anterior-left; axial volume axes (P, L, S): [:, :, k] is radiological
    centre = geometry.voxel_to_world(vol.affine, np.argwhere(mask > 0).mean(axis=0))
    sag_hu, sag_aff = geometry.reorient(vol.hu, vol.affine, "IPL")
    sag_mask, _ = geometry.reorient(mask, vol.affine, "IPL")
    ax_hu, ax_aff = geometry.reorient(vol.hu, vol.affine, "PLS")
    ax_mask, _ = geometry.reorient(mask, vol.affine, "PLS")
    i_sag = int(round(geometry.world_to_voxel(sag_aff, centre)[2]))
    slice_world = geometry.voxel_to_world(vol.affine, np.array([0.0, 0.0, k]))
    k_ax = int(round(geometry.world_to_voxel(ax_aff, slice_world)[2]))
    k_sag = geometry.world_to_voxel(sag_aff, slice_world)[0]

    cmap = ListedColormap(COLOURS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2))
    sp = geometry.spacing_of(sag_aff)
    views = [(axes[0], sag_hu[:, :, i_sag], sag_mask[:, :, i_sag], sp[0] / sp[1],
              "sagittal (superior up, anterior left)"),
             (axes[1], ax_hu[:, :, k_ax], ax_mask[:, :, k_ax],
              geometry.spacing_of(ax_aff)[0] / geometry.spacing_of(ax_aff)[1],
              f"axial, file {int(vol.file_numbers[k])} (anterior up, patient right on the "
              f"left)")]
    for n, (ax, img, lab, aspect, title) in enumerate(views):
        ax.imshow(img, cmap="gray", vmin=-250, vmax=1250, aspect=aspect, interpolation="nearest")
        if n == 0:  # sagittal: filled labels
            shown = np.ma.masked_where((lab < 1) | (lab > 7), lab.astype(float) - 1)
            ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=6.5, alpha=0.35, aspect=aspect,
                      interpolation="nearest")
        else:  # axial: outlines, so the crack inside the bone stays visible
            for c in range(1, 8):
                if (lab == c).any():
                    ax.contour(lab == c, levels=[0.5], colors=[COLOURS[c - 1]], linewidths=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].axhline(k_sag, color="yellow", lw=0.8, ls="--")
    if box is not None:
        corners = np.array([[box.x, box.y, k], [box.x + box.width, box.y + box.height, k]])
        d = geometry.world_to_voxel(ax_aff, geometry.voxel_to_world(vol.affine, corners - 0.5))
        (r0, c0), (r1, c1) = d[:, :2].min(axis=0), d[:, :2].max(axis=0)
        axes[1].add_patch(mpatches.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False,
                                             edgecolor="yellow", lw=1.2))
        axes[1].text(c0, r0 - 1.5, "fracture box", color="yellow", fontsize=8)
    handles = [mpatches.Patch(color=c, label=v) for c, v in zip(COLOURS, VERTEBRAE)]
    fig.legend(handles=handles, loc="lower center", ncol=7, frameon=False)
    what = "and a fracture" if box is not None else ""
    fig.suptitle(f"synthetic study {uid}: aligned mask (C1–C7) {what}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
        tmp.chmod(0o644)
    plt.close(fig)
    return uid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="a dataset written by `cspine synth`")
    parser.add_argument("out_png", type=Path, help="where to write the PNG")
    parser.add_argument("--uid", help="study to draw (default: the largest crack box)")
    parser.add_argument("--slice-number", type=int, help="file number of the axial slice")
    args = parser.parse_args()
    print(make_figure(args.data_dir, args.out_png, args.uid, args.slice_number))


if __name__ == "__main__":
    main()
