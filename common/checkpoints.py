"""A ``ModelCheckpoint`` whose ``last.ckpt`` is really the last epoch, for both stages.

Lightning 2.6's ``save_last=True`` rewrites ``last.ckpt`` only in a step where a top-k checkpoint
was saved, so with ``save_top_k: 1`` it holds the best validation epoch: ``--ckpt_path last``
would then resume from an earlier epoch (repeating epochs, rewinding the LR schedule), and
anything read from "the last model" would have been chosen on the validation fold.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint


class EpochEndModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also writes ``last.ckpt`` at the end of every
    epoch in which the top-k logic saved nothing, when ``save_last`` is on.

    Lightning saves either at the end of the training epoch or at the end of validation (its
    ``_should_save_on_train_epoch_end``); the extra save happens in the same hook.
    """

    def _save_last_if_missing(self, trainer: Any, at_train_epoch_end: bool) -> None:
        if not self.save_last or at_train_epoch_end != self._should_save_on_train_epoch_end(trainer):
            return
        if not self._should_skip_saving_checkpoint(trainer):  # also False if saved this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missing(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missing(trainer, at_train_epoch_end=False)
