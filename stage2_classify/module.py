"""The stage-2 LightningModule: one vertebra crop → the probability that this vertebra is fractured.

Input float32 (B, C, X, Y, Z) (see :mod:`stage2_classify.transforms`), a backbone injected from
YAML produces features (B, F); a learned vertebra embedding (B, F) is added where configured, and a
linear head gives one logit per crop. Validation aggregates the crops of each fold study into the
8 competition columns (absent vertebrae → training-fold prior, ``patient_overall`` by noisy-OR)
and logs the competition metric in both forms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from common.labels import OVERALL, PREVALENCE, TARGETS, VERTEBRAE
from common.metric import auc_per_target, competition_loss
from stage2_classify.aggregate import aggregate, crops_to_study
from stage2_classify.nets import feature_dim
from stage2_classify.transforms import Preprocess, flip_lr


def metric_weighted_bce(logits: torch.Tensor, y: torch.Tensor, w_neg: torch.Tensor,
                        w_pos: torch.Tensor, form: str = "global") -> torch.Tensor:
    """Binary cross-entropy weighted as the competition metric weighs (RSNA_FACTS.md §1).

    Args:
        logits: (N, K) raw scores.
        y: (N, K) 0/1 labels.
        w_neg: (K,) weight of a label-0 element per column.
        w_pos: (K,) weight of a label-1 element per column.
        form: ``"study"`` (normalise per row, mean over rows) or ``"global"`` (Σ w l / Σ w).

    Returns:
        scalar loss in nats; equals ``common.metric.competition_loss`` for K = 8 and the metric
        weights, in the same form.
    """
    w = torch.where(y > 0.5, w_pos.to(logits), w_neg.to(logits))
    loss = F.binary_cross_entropy_with_logits(logits, y.to(logits), reduction="none")
    if form == "study":
        return ((w * loss).sum(dim=1) / w.sum(dim=1)).mean()
    if form == "global":
        return (w * loss).sum() / w.sum()
    raise ValueError(f"form must be 'study' or 'global', got {form!r}")


def tta_sigmoid(forward, x: torch.Tensor, vertebra: torch.Tensor, flip: bool) -> torch.Tensor:
    """Probabilities (B,) of ``forward(x, vertebra)`` logits, averaged with the left-right flip
    when ``flip``: on a GPU both views in one forward pass of batch 2B (per-sample in eval
    mode), on the CPU one after the other (faster there: benchmarks/results/predict_full_cpu.md).
    Shared by :class:`CropClassifier` and exported networks."""
    if not flip:
        return torch.sigmoid(forward(x, vertebra))
    if x.device.type != "cuda":
        return (torch.sigmoid(forward(x, vertebra)) + torch.sigmoid(forward(flip_lr(x), vertebra))) / 2
    both = torch.sigmoid(forward(torch.cat([x, flip_lr(x)]), torch.cat([vertebra, vertebra])))
    return (both[: len(x)] + both[len(x):]) / 2


class CropClassifier(pl.LightningModule):
    """Per-vertebra fracture classifier.

    Args:
        net: backbone (B, C, X, Y, Z) → (B, F) ending in ``nn.Linear`` (MONAI DenseNet121,
            EfficientNetBN, :class:`~stage2_classify.nets.SmallCNN3d`, …).
        vertebra_embedding: add a learned per-vertebra vector to the features.
        preprocess: how crops become input (linked from the data config; kept in the checkpoint).
        lr: AdamW learning rate (cosine-annealed over ``trainer.max_epochs``).
        weight_decay: AdamW weight decay.
        pos_weight: loss weight of a positive crop relative to a negative one (the metric's 2).
        aux_weight: weight of the auxiliary box z-bin loss (0 = off; needs ``data.aux_boxes``).
        aux_bins: z bins of the auxiliary head (linked from the data config).
        tta_flip: average the left-right flipped prediction at validation/inference.
        log_crops: how many validation crops (with scores) to log as images per epoch.
    """

    def __init__(self, net: nn.Module, vertebra_embedding: bool = True,
                 preprocess: dict | None = None, lr: float = 1e-3, weight_decay: float = 1e-4,
                 pos_weight: float = 2.0, aux_weight: float = 0.0, aux_bins: int = 4,
                 tta_flip: bool = False, log_crops: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        dim = feature_dim(net)
        self.embed = nn.Embedding(len(VERTEBRAE), dim) if vertebra_embedding else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)
        self.head = nn.Linear(dim, 1)
        self.aux_head = nn.Linear(dim, aux_bins) if aux_weight > 0 else None
        self.preprocess = Preprocess.from_dict(preprocess)
        #: Fallback probability of each target (TARGETS order) for absent vertebrae.
        self.register_buffer("prior", torch.tensor([PREVALENCE[t] for t in TARGETS]))
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        if self.embed is not None:
            f = f + self.embed(vertebra)
        return F.relu(f)

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        """Fracture logit (B,) of each crop x (B, C, X, Y, Z) of vertebra index (B,) 0..6."""
        return self.head(self.features(x, vertebra)).squeeze(1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, vertebra: torch.Tensor, tta_flip: bool | None = None,
                      logits: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (B,), averaged over the left-right flip when ``tta_flip``; ``logits``
        of ``x`` already computed (B,) save the plain forward pass."""
        tta = self.hparams.tta_flip if tta_flip is None else tta_flip
        if logits is None:
            return tta_sigmoid(self, x, vertebra, tta)
        p = torch.sigmoid(logits)
        if tta:
            p = (p + torch.sigmoid(self(flip_lr(x), vertebra))) / 2
        return p

    def prior_dict(self) -> dict[str, float]:
        return {t: float(v) for t, v in zip(TARGETS, self.prior.tolist())}

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, feats: torch.Tensor
              ) -> torch.Tensor:
        one = torch.ones(1, device=logits.device)
        loss = metric_weighted_bce(logits[:, None], batch["y"][:, None], one,
                                   one * self.hparams.pos_weight)
        if self.aux_head is not None and "aux" in batch and batch["aux_mask"].sum() > 0:
            aux = F.binary_cross_entropy_with_logits(self.aux_head(feats), batch["aux"],
                                                     reduction="none").mean(dim=1)
            m = batch["aux_mask"]
            loss = loss + self.hparams.aux_weight * (aux * m).sum() / m.sum()
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        feats = self.features(batch["x"], batch["vertebra"])
        loss = self._loss(batch, self.head(feats).squeeze(1), feats)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(batch["y"]))
        if batch_idx == 0:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False,
                     on_epoch=True, batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        feats = self.features(batch["x"], batch["vertebra"])
        logits = self.head(feats).squeeze(1)
        self.log("val/loss", self._loss(batch, logits, feats), on_epoch=True, sync_dist=True,
                 batch_size=len(batch["y"]))
        prob = self.predict_proba(batch["x"], batch["vertebra"], logits=logits.detach())
        self._val.append((batch["index"].detach(), prob.detach().float()))
        if batch_idx == 0:
            self._log_crops(batch, prob)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"index": row index into the dataset, "prob": fracture probability}`` per crop."""
        return {"index": batch["index"], "prob": self.predict_proba(batch["x"], batch["vertebra"])}

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        if not self._val or self.trainer.sanity_checking:
            return
        index = torch.cat([i for i, _ in self._val])
        prob = torch.cat([p for _, p in self._val])
        if self.trainer.world_size > 1:  # every rank scores the whole fold (DDP pads; dedupe)
            index, prob = self.all_gather(index).flatten(), self.all_gather(prob).flatten()
        metrics = self.fold_metrics(index.cpu().numpy(), prob.cpu().numpy())
        self.log_dict(metrics, sync_dist=False)

    def fold_metrics(self, index: np.ndarray, prob: np.ndarray) -> dict[str, float]:
        """Competition metric and AUCs of the validation fold from crop probabilities."""
        dm = self.trainer.datamodule
        rows = dm.val_crop_frame()
        uniq, first = np.unique(index, return_index=True)
        crops = rows.iloc[uniq].assign(prob=prob[first])
        prior = self.prior_dict()
        pred = aggregate(crops_to_study(crops, dm.val_uids, prior), "noisy_or")
        y = dm.val_labels
        out = {"val/comp_loss": competition_loss(y, pred, form="study"),
               "val/comp_loss_global": competition_loss(y, pred, form="global")}
        aucs = auc_per_target(y, pred)
        out.update({f"val/auc_{t}": aucs[t] for t in VERTEBRAE})
        out["val/auc_overall"] = aucs[OVERALL]
        out["val/auc_mean_vertebra"] = aucs["mean_vertebra"]
        return {k: float(v) for k, v in out.items()}

    def _log_crops(self, batch: dict[str, torch.Tensor], prob: torch.Tensor) -> None:
        from pytorch_lightning.loggers import WandbLogger

        logger = self.logger
        n = min(self.hparams.log_crops, len(prob))
        if not n or self.trainer.sanity_checking or self.global_rank != 0 \
                or not isinstance(logger, WandbLogger):
            return
        rows = self.trainer.datamodule.val_crop_frame()
        images, captions = [], []
        for i in range(n):
            x = batch["x"][i].detach().cpu()
            z = x.shape[-1] // 2
            img = x[0, :, :, z].numpy()
            edge = x[self.preprocess.num_image_channels, :, :, z].numpy() > 0.5
            rgb = np.stack([np.maximum(img, 0.5 * edge), img, img], axis=-1)
            r = rows.iloc[int(batch["index"][i])]
            images.append((np.swapaxes(rgb, 0, 1) * 255).astype(np.uint8))  # rows = Y
            captions.append(f"{r['study_uid'][-8:]} {r['vertebra']} y={int(batch['y'][i])} "
                            f"p={float(prob[i]):.2f}")
        logger.log_image(key="val/crops", images=images, caption=captions)

    # ------------------------------------------------------------------ setup
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the backbone's ``class_path``/``init_args`` so inference can rebuild it."""
        config = getattr(self, "net_config", None)
        if config is None:
            raise RuntimeError("CropClassifier.net_config is unset: train through the stage-2 CLI "
                               "(python -m stage2_classify fit), which records the backbone config")
        checkpoint["net_config"] = config
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        prior = getattr(dm, "prior", None)
        if prior is not None:
            self.prior.copy_(torch.tensor([prior[t] for t in TARGETS]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

