"""LightningModule for stage 1: a 3D segmentation network injected from YAML, DiceCE loss.

The network is any ``nn.Module`` mapping (B, 1, X, Y, Z) windowed CT to (B, num_classes, X, Y,
Z) logits (``class_path: monai.networks.nets.UNet`` by default; SegResNet, DynUNet, … by
config). The geometry and intensity settings the network was trained with (grid, HU window,
thoracic mode) are hyperparameters, so a checkpoint alone is enough to run inference
(:func:`stage1_segment.inference.load_model`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from common.labels import VERTEBRAE

#: Tensor dims (B, C, X, Y, Z): the left/right axis X is dim 2 (see stage1_segment.transforms).
LR_DIM = 2


def tta_softmax(forward, image: torch.Tensor, flip: bool) -> torch.Tensor:
    """Softmax probabilities (B, C, X, Y, Z) of ``forward(image)`` logits, averaged with those of
    the left/right mirror when ``flip``. On a GPU both go through one forward pass of batch 2B
    (the networks are per-sample in eval mode); on the CPU one after the other, which is as fast
    there (benchmarks/results/predict_full_cpu.md) and holds half the activations. Shared by
    :class:`Stage1Module` and exported networks."""
    if not flip:
        return torch.softmax(forward(image).float(), dim=1)
    if image.device.type != "cuda":
        mirror = torch.softmax(forward(torch.flip(image, dims=(LR_DIM,))).float(), dim=1)
        return 0.5 * (torch.softmax(forward(image).float(), dim=1)
                      + torch.flip(mirror, dims=(LR_DIM,)))
    n = image.shape[0]
    both = torch.softmax(forward(torch.cat([image, torch.flip(image, dims=(LR_DIM,))])).float(),
                         dim=1)
    return 0.5 * (both[:n] + torch.flip(both[n:], dims=(LR_DIM,)))


class Stage1Module(pl.LightningModule):
    """Vertebra segmentation C1–C7.

    Args:
        net: the network, (B, 1, X, Y, Z) → (B, num_classes, X, Y, Z) logits.
        num_classes: output classes incl. background (linked from ``data.num_classes``).
        hu_window: (low, high) HU → 0..1 (linked from the data module; kept for inference).
        grid_shape: model grid (linked from the data module; kept for inference).
        grid_spacing_mm: model voxel size (linked; kept for inference).
        patch_size: sliding-window ROI (X, Y, Z) when set; whole-volume inference when None.
        thoracic: thoracic label mode of the training labels (linked).
        lr: AdamW learning rate (cosine decay to 1 % over ``trainer.max_epochs``).
        weight_decay: AdamW weight decay.
        tta_flip_lr: average the prediction with its left/right mirror at validation/inference.
        sw_overlap: sliding-window overlap (only with ``patch_size``).
        overlay_count: validation studies drawn as overlays each epoch (rank 0 only).
    """

    def __init__(self, net: nn.Module, num_classes: int = 8,
                 hu_window: tuple[float, float] = (-400.0, 2000.0),
                 grid_shape: list[int] | None = None,
                 grid_spacing_mm: list[float] | None = None,
                 patch_size: list[int] | None = None,
                 thoracic: str = "background",
                 lr: float = 1e-3, weight_decay: float = 1e-5,
                 tta_flip_lr: bool = False, sw_overlap: float = 0.25,
                 overlay_count: int = 2) -> None:
        super().__init__()
        # under LightningCLI the network is saved as its class_path/init_args config, so
        # load_from_checkpoint rebuilds it without the YAML
        self.save_hyperparameters()
        self.net = net
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._dice_sum = torch.zeros(len(VERTEBRAE), dtype=torch.float64)
        self._dice_n = torch.zeros(len(VERTEBRAE), dtype=torch.float64)
        self._overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple, str]] = []

    # ------------------------------------------------------------------ inference
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, X, Y, Z) for windowed images (B, 1, X, Y, Z)."""
        if self.hparams.patch_size is None:
            return self.net(image)
        return sliding_window_inference(image, self.hparams.patch_size, 1, self.net,
                                        overlap=self.hparams.sw_overlap, mode="gaussian")

    @torch.no_grad()
    def predict_probs(self, image: torch.Tensor, tta_flip_lr: bool | None = None) -> torch.Tensor:
        """Softmax probabilities (B, num_classes, X, Y, Z), averaged over the L/R mirror if asked."""
        tta = self.hparams.tta_flip_lr if tta_flip_lr is None else tta_flip_lr
        return tta_softmax(self, image, tta)

    # ------------------------------------------------------------------ steps
    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # Dice + CE in fp32 even under mixed precision (soft Dice sums overflow/underflow in fp16)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.loss_fn(logits.float(), label.long())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = self._loss(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        logits = self(image)
        self.log("val/loss", self._loss(logits, label), on_epoch=True, sync_dist=True,
                 batch_size=image.shape[0])
        probs = torch.softmax(logits.float(), dim=1)
        if self.hparams.tta_flip_lr:
            probs = self.predict_probs(image, tta_flip_lr=True)
        pred = probs.argmax(dim=1, keepdim=True)
        n = self.hparams.num_classes
        onehot = lambda x: torch.nn.functional.one_hot(x[:, 0].long(), n).movedim(-1, 1)  # noqa: E731
        scores = self.dice(onehot(pred), onehot(label))[:, : len(VERTEBRAE)].double().cpu()
        valid = ~torch.isnan(scores)
        self._dice_sum += torch.where(valid, scores, 0).sum(0)
        self._dice_n += valid.sum(0)
        if self.global_rank == 0 and len(self._overlays) < self.hparams.overlay_count:
            uid = batch.get("uid", [""])[0]
            spacing = tuple(float(s) for s in batch["spacing"][0]) if "spacing" in batch \
                else (1.0, 1.0, 1.0)
            self._overlays.append((image[0, 0].float().cpu().numpy(),
                                   label[0, 0].cpu().numpy().astype(np.uint8),
                                   pred[0, 0].cpu().numpy().astype(np.uint8), spacing,
                                   str(uid)))

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._dice_sum.to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._dice_n.to(self.device), reduce_op="sum")
        per = (total / count.clamp(min=1)).float()
        for i, name in enumerate(VERTEBRAE):
            if count[i] > 0:
                self.log(f"val/dice_{name}", per[i], sync_dist=False)
        seen = count > 0
        mean = per[seen].mean() if seen.any() else torch.tensor(0.0, device=self.device)
        self.log("val/dice_mean", mean, prog_bar=True, sync_dist=False)
        self._dice_sum.zero_()
        self._dice_n.zero_()
        self._log_overlays()
        self._overlays.clear()

    @rank_zero_only
    def _log_overlays(self) -> None:
        if not self._overlays or not isinstance(self.logger, WandbLogger) or \
                self.trainer.sanity_checking:
            return
        from stage1_segment.overlays import overlay_panel

        images = [overlay_panel(img, lab, pred, spacing, title=uid)
                  for img, lab, pred, spacing, uid in self._overlays]
        self.logger.log_image(key="val/overlays", images=images,
                              caption=[uid for *_, uid in self._overlays],
                              step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self.trainer else 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs,
                                                           eta_min=self.hparams.lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the W&B run id lets an online resume continue the same run
        if isinstance(self.logger, WandbLogger):
            checkpoint["wandb_run_id"] = self.logger.version

