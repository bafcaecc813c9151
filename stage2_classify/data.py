"""Stage-2 data: crops from the stage-1 manifest, labels from train.csv, folds from the shared file.

Stage 2 reads only the manifest (``common.manifest.read_manifest``), ``train.csv`` (and
``train_bounding_boxes.csv`` when the auxiliary box signal is on) and ``$WORK/folds.csv``
(``common.folds.ensure_folds``). One sample is one present (study, vertebra) crop; a study's absent
vertebrae get the training-fold prior at aggregation time.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, default_collate

from common.dataset import RSNADataset
from common.folds import ensure_folds
from common.labels import TARGETS, VERTEBRAE
from common.manifest import read_manifest
from common.metric import baseline_prevalence
from stage2_classify.augment import BatchAugment
from stage2_classify.transforms import BONE_WINDOW, Preprocess

UID = "StudyInstanceUID"


def load_crop(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a crop ``.npz``: (image int16 (X,Y,Z) HU, mask uint8 (X,Y,Z), affine (4,4) → RAS mm)."""
    try:
        with np.load(path) as z:
            return z["image"], z["mask"], z["affine"]
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: unreadable crop ({err}); rerun `make crops`") from err


def crop_z_of_file_numbers(row: pd.Series, numbers: Sequence[int], crop_z: int) -> np.ndarray:
    """Map DICOM file numbers (``train_bounding_boxes.csv`` ``slice_number``) to crop slice indices.

    The manifest gives the file numbers of the box's lowest and highest sorted slice
    (``file_number_lo/hi`` at ``vox_lo_z/vox_hi_z``); file numbers run linearly with the sorted
    slice index (up or down). The crop grid (``common.geometry.box_grid``) spans the box plus
    ``margin_mm`` in ``crop_z`` slices along the source slice axis, so its source slice spacing is
    ``(spacing_z · crop_z − 2 · margin_mm) / n_box_slices``.

    Returns:
        float crop slice indices (may lie outside [0, crop_z) when the box misses the crop).
    """
    lo, hi = int(row["vox_lo_z"]), int(row["vox_hi_z"])
    fn_lo, fn_hi = int(row["file_number_lo"]), int(row["file_number_hi"])
    n_box = hi - lo + 1
    step = (hi - lo) / (fn_hi - fn_lo) if fn_hi != fn_lo else 0.0
    src_z = lo + (np.asarray(numbers, float) - fn_lo) * step
    src_sp = (float(row["spacing_z"]) * crop_z - 2 * float(row["margin_mm"])) / n_box
    margin_vox = float(row["margin_mm"]) / src_sp if src_sp > 0 else 0.0
    face_lo = lo - 0.5 - margin_vox
    scale = (n_box + 2 * margin_vox) / crop_z
    return (src_z - face_lo) / scale - 0.5


PARTS = ("image", "maps", "mask")


class CropDataset(Dataset):
    """Present crops of a manifest, prepared (``Preprocess.prepare``) but not yet assembled.

    Each item: the parts ``image`` float32 (W, X, Y, Z), ``maps`` float32 (K, X, Y, Z) (only when
    lucency or bone gaps are on) and ``mask`` uint8 (M, X, Y, Z); ``vertebra`` int64 (0..6), ``y``
    float32 label (NaN for test rows), ``index`` int64 row index into ``rows``, and
    ``aux``/``aux_mask`` float32 (bins,) / () when box targets are given. :func:`batch_inputs`
    turns a collated batch into the network input ``x`` (after augmentation, when training).
    """

    def __init__(self, rows: pd.DataFrame, preprocess: Preprocess, labels: np.ndarray | None = None,
                 cache: bool = True, aux: np.ndarray | None = None) -> None:
        self.rows = rows.reset_index(drop=True)
        self.preprocess = preprocess
        self.labels = labels
        self.aux = aux
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def _prepared(self, i: int) -> dict[str, torch.Tensor]:
        """The crop's deterministic parts (``Preprocess.prepare``; mask as uint8), cached when
        ``cache`` is on: the morphology of the gap and lucency maps then runs once per crop, not
        once per epoch."""
        if self._cache is not None and i in self._cache:
            item = self._cache[i]
        else:
            image, mask, _ = load_crop(self.rows.at[i, "crop_path"])
            item = self.preprocess.prepare(image, mask, str(self.rows.at[i, "vertebra"]))
            item = {k: v.to(torch.uint8) if k == "mask" else v for k, v in item.items()}
            if self._cache is not None:
                self._cache[i] = item
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = str(self.rows.at[i, "vertebra"])
        item = {**self._prepared(i),
                "vertebra": torch.tensor(VERTEBRAE.index(v)),
                "y": torch.tensor(float(self.labels[i]) if self.labels is not None else float("nan")),
                "index": torch.tensor(i)}
        if self.aux is not None:
            item["aux"] = torch.from_numpy(self.aux[i, :-1].astype(np.float32))
            item["aux_mask"] = torch.tensor(float(self.aux[i, -1]))
        return item


def batch_inputs(batch: dict[str, Any], preprocess: Preprocess,
                 augment: BatchAugment | None = None) -> dict[str, Any]:
    """Replace a collated batch's parts (``image``, ``maps``, ``mask``) by the network input
    ``x`` float32 (B, C, X, Y, Z), augmenting the batch first when ``augment`` is given.
    Runs on the batch's device."""
    out = {k: v for k, v in batch.items() if k not in PARTS}
    parts = _float_parts(batch)
    if augment is not None:
        parts = augment(parts)
    out["x"] = preprocess.assemble_batch(parts, batch["vertebra"])
    return out


class AugmentingCollate:
    """``default_collate``, then :class:`BatchAugment` on the batch's parts: the augmentation of
    ``augment_on: worker``, run by the DataLoader worker (picklable)."""

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        batch.update(self.augment(_float_parts(batch)))
        return batch


def _float_parts(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The prepared parts of a collated batch as float32 (masks arrive as uint8)."""
    return {k: batch[k].float() for k in PARTS if k in batch}


class CropDataModule(pl.LightningDataModule):
    """Fold ``fold`` of the crops: train on the other folds, validate/predict on this one.

    Args:
        manifest: stage-1 crop manifest (``$WORK/stage1/crops/vertebrae.csv``).
        data_root: RSNA-layout folder (train.csv, train_bounding_boxes.csv).
        folds_csv: shared folds file (``$WORK/folds.csv``), created from train.csv if missing.
        fold: validation fold.
        n_folds: number of folds in the folds file.
        batch_size: crops per batch.
        num_workers: DataLoader workers.
        windows: HU windows ``(level, width)``, one channel each.
        all_mask: add an all-vertebrae mask channel.
        vertebra_channels: add 7 one-hot vertebra channels.
        masked_image: add the first window masked by the target vertebra dilated by this many
            voxels (None = no such channel).
        lucency: ``(below_hu, width_hu[, erode_voxels])``: add the target vertebra's lucency map
            ``clip((below − HU) / width, 0, 1)`` (None = no such channel).
        lucency_fill: close and hole-fill the target mask before the lucency erosion.
        gap: ``(bone_hu, closing_steps)``: add the bone-gap channel (thin lucent gaps in bone
            that a binary closing fills, around the target vertebra; None = no such channel).
        augment: train-time augmentation on/off (``stage2_classify.augment.BatchAugment``, on
            whole batches, where ``augment_on`` says); the other ``aug_*`` values tune it
            (``aug_affine_prob``: share of crops that get the random affine).
        augment_on: ``"device"`` augments each batch where it trains (after the transfer to the
            GPU); ``"worker"`` augments it in the DataLoader worker that collates it (on 2 CPU
            cores the worker's core would otherwise idle while the network runs on the other).
        sampler: ``"shuffle"`` or ``"balanced"`` (positives drawn with probability ``pos_fraction``).
        pos_fraction: share of positive crops per epoch with the balanced sampler.
        aux_boxes: build per-crop z-bin targets from train_bounding_boxes.csv.
        aux_bins: number of z bins of the auxiliary target.
        cache: keep each crop's prepared channels in memory after the first read (in every
            DataLoader worker: about 14 bytes per crop voxel with 3 image channels; for the
            48×48×20 demo crops ~0.6 MB each, for 96×96×64 real-data crops ~8 MB each, so turn it
            off for the full dataset).
    """

    def __init__(self, manifest: str, data_root: str, folds_csv: str, fold: int = 0,
                 n_folds: int = 5, batch_size: int = 16, num_workers: int = 0,
                 # the default list is never mutated, and LightningCLI shows it as written
                 windows: list[tuple[float, float]] = [BONE_WINDOW],  # noqa: B006
                 all_mask: bool = False,
                 vertebra_channels: bool = False, masked_image: int | None = None,
                 lucency: list[float] | None = None, lucency_fill: bool = False,
                 gap: list[float] | None = None, augment: bool = True, aug_rotate_deg: float = 10.0,
                 aug_scale: float = 0.1, aug_flip_lr: bool = True, aug_noise_std: float = 0.02,
                 aug_affine_prob: float = 0.8, augment_on: Literal["device", "worker"] = "device",
                 sampler: Literal["shuffle", "balanced"] = "shuffle", pos_fraction: float = 0.3,
                 aux_boxes: bool = False, aux_bins: int = 4, cache: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocess = Preprocess(windows=windows, all_mask=all_mask,
                                     vertebra_channels=vertebra_channels, masked_image=masked_image,
                                     lucency=lucency, lucency_fill=lucency_fill, gap=gap)
        self.augmenter: BatchAugment | None = None
        self.train_ds: CropDataset | None = None
        self.val_ds: CropDataset | None = None

    # ------------------------------------------------------------------ tables
    def _tables(self) -> None:
        hp = self.hparams
        self.manifest_df = read_manifest(hp.manifest)
        ds = RSNADataset(hp.data_root)
        self.labels_df = ds.labels.set_index(UID)
        folds = ensure_folds(ds.labels, hp.folds_csv, n_folds=hp.n_folds)
        self.folds = folds.set_index(UID)["fold"]
        if hp.fold not in set(self.folds):
            raise ValueError(f"fold {hp.fold} not in {hp.folds_csv} (folds {sorted(set(self.folds))})")
        train_uids = self.folds.index[self.folds != hp.fold]
        self.val_uids = self.folds.index[self.folds == hp.fold].tolist()
        #: Constant-prediction prior of the training folds (fallback for absent vertebrae).
        self.prior = baseline_prevalence(self.labels_df.loc[train_uids].reset_index())
        self.val_labels = self.labels_df.loc[self.val_uids, list(TARGETS)]
        self._boxes = ds.boxes if hp.aux_boxes else None

    def _rows(self, uids: Sequence[str]) -> pd.DataFrame:
        m = self.manifest_df
        return m[m["present"] & m["study_uid"].isin(set(uids))].reset_index(drop=True)

    def _crop_labels(self, rows: pd.DataFrame) -> np.ndarray:
        lab = self.labels_df
        return np.array([lab.at[u, v] for u, v in zip(rows["study_uid"], rows["vertebra"])], float)

    def _aux_targets(self, rows: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
        """(N, bins + 1): z-bin fracture targets and a last column saying whether they are known."""
        bins = self.hparams.aux_bins
        out = np.zeros((len(rows), bins + 1), np.float32)
        by_study = self._boxes.groupby(UID)["slice_number"].apply(list).to_dict()
        for i, row in rows.iterrows():
            if labels[i] < 0.5:
                out[i, -1] = 1.0  # a healthy vertebra has no fracture slice anywhere
                continue
            numbers = by_study.get(row["study_uid"])
            if not numbers:
                continue
            crop_z = int(load_crop(row["crop_path"])[0].shape[2])
            z = crop_z_of_file_numbers(row, numbers, crop_z)
            z = z[(z >= -0.5) & (z < crop_z - 0.5)]
            if len(z):
                out[i, np.unique(np.clip((z + 0.5) * bins // crop_z, 0, bins - 1).astype(int))] = 1
                out[i, -1] = 1.0
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        hp = self.hparams
        self._tables()
        train_rows = self._rows(self.folds.index[self.folds != hp.fold])
        val_rows = self._rows(self.val_uids)
        if not len(train_rows) or not len(val_rows):
            raise ValueError(f"fold {hp.fold}: {len(train_rows)} train and {len(val_rows)} val crops "
                             f"in {hp.manifest}; does the manifest hold the train studies?")
        y_train, y_val = self._crop_labels(train_rows), self._crop_labels(val_rows)
        self.augmenter = BatchAugment(hp.aug_rotate_deg, hp.aug_scale, flip_lr=hp.aug_flip_lr,
                                      noise_std=hp.aug_noise_std, prob=hp.aug_affine_prob) \
            if hp.augment else None
        aux_tr = self._aux_targets(train_rows, y_train) if hp.aux_boxes else None
        aux_va = self._aux_targets(val_rows, y_val) if hp.aux_boxes else None
        self.train_ds = CropDataset(train_rows, self.preprocess, y_train, hp.cache, aux_tr)
        self.val_ds = CropDataset(val_rows, self.preprocess, y_val, hp.cache, aux_va)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Build ``x`` on the device; augment only batches of the training loop."""
        training = bool(self.trainer is not None and self.trainer.training)
        on_device = training and self.hparams.augment_on == "device"
        return batch_inputs(batch, self.preprocess, self.augmenter if on_device else None)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        kw: dict[str, Any] = {"batch_size": hp.batch_size, "num_workers": hp.num_workers,
                              "drop_last": len(self.train_ds) > hp.batch_size,
                              "persistent_workers": hp.num_workers > 0}
        if self.augmenter is not None and hp.augment_on == "worker":
            kw["collate_fn"] = AugmentingCollate(self.augmenter)
        if hp.sampler == "balanced":
            y = self.train_ds.labels
            pos = max(float(y.mean()), 1e-6)
            w = np.where(y > 0.5, hp.pos_fraction / pos, (1 - hp.pos_fraction) / max(1 - pos, 1e-6))
            gen = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
            kw["sampler"] = WeightedRandomSampler(torch.as_tensor(w), len(y), generator=gen)
        else:
            kw["shuffle"] = True
        return DataLoader(self.train_ds, **kw)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def val_crop_frame(self) -> pd.DataFrame:
        """(study_uid, vertebra) of each validation crop, in dataset order."""
        return self.val_ds.rows[["study_uid", "vertebra"]]

    @property
    def num_channels(self) -> int:
        return self.preprocess.num_channels


def num_channels(windows: list, all_mask: bool, vertebra_channels: bool,
                 masked_image: int | None, lucency: tuple | None, lucency_fill: bool,
                 gap: tuple | None) -> int:
    """Input channel count for a data config (the ``in_channels`` link of the CLI)."""
    return Preprocess(windows, all_mask, vertebra_channels, masked_image, lucency, lucency_fill,
                      gap).num_channels


def preprocess_dict(windows: list, all_mask: bool, vertebra_channels: bool,
                    masked_image: int | None, lucency: tuple | None, lucency_fill: bool,
                    gap: tuple | None) -> dict:
    """The preprocessing a checkpoint must remember (the ``model.preprocess`` link of the CLI)."""
    return Preprocess(windows, all_mask, vertebra_channels, masked_image, lucency, lucency_fill,
                      gap).to_dict()
