"""``EpochEndModelCheckpoint``: last.ckpt is the last epoch even when the best epoch was earlier."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.checkpoints import EpochEndModelCheckpoint


class _GetsWorse(pl.LightningModule):
    """A linear model whose logged ``val/score`` rises every epoch (so epoch 0 stays the best)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/score", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


@pytest.mark.parametrize("val_every", [1, 2])  # Lightning saves at train-epoch end / val end
def test_last_checkpoint_is_the_final_epoch_and_best_is_kept(tmp_path, val_every):
    cb = EpochEndModelCheckpoint(dirpath=tmp_path, monitor="val/score", mode="min", save_top_k=1,
                                 save_last=True, filename="best")
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         check_val_every_n_epoch=val_every)
    trainer.fit(_GetsWorse(), _loader(), _loader())
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 3 and last["global_step"] == 8  # 4 epochs × 2 steps
    assert best["epoch"] == val_every - 1  # the first validated epoch
    assert cb.best_model_path.endswith("best.ckpt")
