"""LightningDataModule for stage 1: cached model-grid volumes of the segmented train studies.

``prepare_data`` fills the cache (:mod:`stage1_segment.prepare`, skipping cached studies) for
the train studies that have a mask; ``setup`` splits them by the shared fold file
``$WORK/folds.csv`` (:func:`common.folds.ensure_folds`): the studies of ``val_fold`` validate,
the others train. The cache files already are the persistent cache (decoded, resampled), so
MONAI's ``CacheDataset`` only keeps the loaded, windowed arrays in memory (``cache_rate``)
so the random augmentations start from RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate

from common.labels import num_classes as count_classes
from common.layout import WorkLayout
from stage1_segment.prepare import GridSettings, cache_path, list_studies, prepare_studies
from stage1_segment.transforms import AugmentConfig, train_transforms, val_transforms


def run_seed(default: int) -> int:
    """The seed of this run: the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else
    ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else int(default)


class Stage1DataModule(pl.LightningDataModule):
    """Segmented train studies on the model grid, split by the shared folds.

    Args:
        data_root: RSNA-layout dataset folder (train.csv, train_images/, segmentations/).
        work_dir: output root ``$WORK`` (cache under ``$WORK/stage1/cache``, folds in
            ``$WORK/folds.csv``).
        grid_shape: fixed model grid (X, Y, Z) in voxels; or
        grid_spacing_mm: fixed voxel size (X, Y, Z) mm (then set ``patch_size``).
        patch_size: random training patch (X, Y, Z) voxels; ``None`` trains on the whole grid.
        thoracic: T1–T12 as ``"background"`` or ``"merge"`` (an extra class).
        hu_window: (low, high) HU mapped to 0..1 (stored in the model's hyperparameters).
        n_folds: folds of the shared fold file.
        val_fold: the fold used for validation.
        fold_seed: seed used only if the fold file does not exist yet.
        batch_size: training volumes per step (validation uses 1).
        num_workers: DataLoader worker processes.
        cache_rate: share of loaded volumes kept in memory by ``CacheDataset``.
        prepare_jobs: processes for ``prepare_data``.
        lenient: repair loadable DICOM defects when preparing (recorded in the QC table).
        augment: augmentation strengths.
    """

    def __init__(self, data_root: str, work_dir: str,
                 grid_shape: list[int] | None = None,
                 grid_spacing_mm: list[float] | None = None,
                 patch_size: list[int] | None = None,
                 thoracic: str = "background",
                 hu_window: tuple[float, float] = (-400.0, 2000.0),
                 n_folds: int = 5, val_fold: int = 0, fold_seed: int = 42,
                 batch_size: int = 2, num_workers: int = 0, cache_rate: float = 1.0,
                 prepare_jobs: int = 2, lenient: bool = False,
                 augment: AugmentConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_root = Path(data_root)
        self.work_dir = Path(work_dir)
        self.settings = GridSettings(shape=grid_shape, spacing_mm=grid_spacing_mm,
                                     thoracic=thoracic)
        if grid_spacing_mm is not None and patch_size is None:
            raise ValueError("grid_spacing_mm gives grids of varying shape: set data.patch_size")
        self.patch_size = list(patch_size) if patch_size is not None else None
        self.hu_window = tuple(float(w) for w in hu_window)
        self.augment = augment or AugmentConfig()
        self.train_uids: list[str] = []
        self.val_uids: list[str] = []

    @property
    def num_classes(self) -> int:
        """Output classes including background (8, or 9 with merged thoracic)."""
        return count_classes(self.settings.thoracic)

    def prepare_data(self) -> None:
        """Fill the cache for the segmented train studies (cached studies are skipped; failures
        are QC rows)."""
        prepare_studies(self.data_root, self.work_dir, self.settings, splits=("train",),
                        masked_only=True, jobs=self.hparams.prepare_jobs,
                        lenient=self.hparams.lenient)

    def _usable(self, splits: tuple[str, ...] = ("train",), masked_only: bool = True
                ) -> list[str]:
        studies = list_studies(self.data_root, splits, masked_only=masked_only)
        return [uid for uid, *_ in studies
                if cache_path(self.work_dir, self.settings, uid).is_file()]

    def setup(self, stage: str | None = None) -> None:
        """Split the cached segmented studies by fold (validation = ``val_fold``)."""
        from common.dataset import RSNADataset
        from common.folds import ensure_folds

        labels = RSNADataset(self.data_root).labels
        folds = ensure_folds(labels, WorkLayout(self.work_dir).folds, self.hparams.n_folds,
                             self.hparams.fold_seed)
        fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"]))
        uids = self._usable()
        if not uids:
            raise RuntimeError(f"no cached segmented train studies for {self.data_root} in "
                               f"{self.work_dir}/stage1/cache: run `make stage1-prepare` and "
                               f"check {self.work_dir}/stage1/qc_prepare.csv")
        self.val_uids = [u for u in uids if fold_of.get(u) == self.hparams.val_fold]
        self.train_uids = [u for u in uids if fold_of.get(u) != self.hparams.val_fold]
        if not self.val_uids or not self.train_uids:
            # tiny datasets: too few segmented studies for this fold; hold out the last one
            self.val_uids, self.train_uids = uids[-1:], uids[:-1] or uids[-1:]

    def _items(self, uids: list[str]) -> list[dict[str, str]]:
        return [{"path": os.fspath(cache_path(self.work_dir, self.settings, u))} for u in uids]

    def _dataset(self, uids: list[str], transform) -> Dataset:
        items = self._items(uids)
        if self.hparams.cache_rate > 0:
            return CacheDataset(items, transform, cache_rate=self.hparams.cache_rate,
                                num_workers=0, progress=False)
        return Dataset(items, transform)

    def train_dataloader(self) -> DataLoader:
        transform = train_transforms(self.hu_window, self.augment, self.patch_size)
        # MONAI's random transforms draw from their own RandomState, seeded from the OS, not by
        # seed_everything: seed it from the run's seed so a seeded fit augments the same way
        # (MONAI's DataLoader reseeds it per worker from the seeded torch generator)
        transform.set_random_state(seed=run_seed(self.hparams.fold_seed))
        ds = self._dataset(self.train_uids, transform)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, collate_fn=list_data_collate,
                          persistent_workers=self.hparams.num_workers > 0, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        ds = self._dataset(self.val_uids, val_transforms(self.hu_window, self.patch_size))
        return DataLoader(ds, batch_size=1, shuffle=False, num_workers=self.hparams.num_workers,
                          collate_fn=list_data_collate,
                          persistent_workers=self.hparams.num_workers > 0)
