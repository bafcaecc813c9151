"""LightningCLI for stage 2: ``python -m stage2_classify fit|validate|predict -c configs/stage2/<exp>.yaml``.

Links (derived values are never typed twice):

* ``data.windows, data.all_mask, data.vertebra_channels, data.masked_image, data.lucency,
  data.lucency_fill, data.gap`` →
  ``model.net.init_args.in_channels``
  (channel count) and → ``model.preprocess`` (kept in the checkpoint for inference);
* ``data.aux_bins`` → ``model.aux_bins``.

After ``fit`` the CLI writes ``<default_root_dir>/run.json`` (the fold's chosen checkpoint) and
the fold's out-of-fold predictions ``<oof_dir>/fold<k>.csv`` from it (``--oof_checkpoint last``
by default, ``best`` for the best ``val/comp_loss`` epoch; ``--oof_dir``, default
``<default_root_dir>/../oof``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.cli import LightningCLI

from common.checkpoints import add_checkpoint_group
from common.tracking import RunConfigCallback
from stage2_classify.data import CropDataModule, num_channels, preprocess_dict
from stage2_classify.module import CropClassifier

CHANNEL_SOURCES = ("data.windows", "data.all_mask", "data.vertebra_channels", "data.masked_image",
                   "data.lucency", "data.lucency_fill", "data.gap")


class Stage2CLI(LightningCLI):
    """LightningCLI with the stage-2 links, checkpoint folder and post-fit OOF step."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--threads", type=int | None, default=None,
                            help="torch intra-op threads of the training process (None: torch's "
                                 "default). On a 2-core CPU, 1 thread plus 1 data worker is "
                                 "several times faster than 2 threads competing with the worker")
        parser.add_argument("--oof_checkpoint", type=Literal["last", "best"], default="last",
                            help="checkpoint for the OOF rows and for submission: last (chosen "
                                 "blind to the fold) or best val/comp_loss (optimistic OOF)")
        parser.add_argument("--oof_dir", type=str | None, default=None,
                            help="where fit writes fold<k>.csv OOF predictions "
                                 "(default <trainer.default_root_dir>/../oof)")
        parser.link_arguments(CHANNEL_SOURCES, "model.net.init_args.in_channels",
                              compute_fn=num_channels)
        parser.link_arguments(CHANNEL_SOURCES, "model.preprocess", compute_fn=preprocess_dict)
        parser.link_arguments("data.aux_bins", "model.aux_bins")
        # the checkpoint policy of both stages (common/checkpoints.py); its folder is
        # <default_root_dir>/checkpoints (before_fit)
        add_checkpoint_group(parser, "val/comp_loss", "min",
                             "epoch{epoch:02d}-comp{val/comp_loss:.4f}")

    def _sub(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        import torch

        from common.tracking import apply_wandb_settings

        trainer = self._sub().trainer
        apply_wandb_settings(trainer, trainer.get("default_root_dir") or ".")
        threads = self._sub().get("threads")
        if threads:
            torch.set_num_threads(int(threads))

    def before_fit(self) -> None:
        """Keep checkpoints in ``<default_root_dir>/checkpoints`` and remember the net config."""
        root = Path(self.trainer.default_root_dir)
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) is None:
                cb.dirpath = str(root / "checkpoints")
        self.model.net_config = self._sub()["model"]["net"].as_dict()

    def before_validate(self) -> None:
        self.model.net_config = self._sub()["model"]["net"].as_dict()

    def after_fit(self) -> None:
        """Write run.json and the fold's OOF predictions from the best (else last) checkpoint."""
        from stage2_classify.oof import save_final_checkpoint, write_fold_oof

        if self.trainer.fast_dev_run:
            return
        which = self._sub().get("oof_checkpoint") or "last"
        if which == "last":
            save_final_checkpoint(self.trainer)  # every rank: save_checkpoint is collective
        if not self.trainer.is_global_zero:
            return
        root = Path(self.trainer.default_root_dir)
        oof_dir = Path(self._sub().get("oof_dir") or root.parent / "oof")
        write_fold_oof(self.trainer, self.model, self.datamodule, root, oof_dir, which)


def cli_main(args: list[str] | None = None, run: bool = True) -> Stage2CLI:
    """Entry point; ``args`` for tests (``["fit", "-c", "...", "--trainer.fast_dev_run", "1"]``)."""
    import torch

    # Denormal floats slow CPU convolutions many-fold once small weights decay; flush them.
    torch.set_flush_denormal(True)
    return Stage2CLI(CropClassifier, CropDataModule, args=args, run=run,
                     save_config_callback=RunConfigCallback)


def parse_settings(args: list[str]):
    """The stage-2 config for ``args`` (``-c`` files and ``--section.key`` overrides, no
    subcommand), read through this LightningCLI's own parser (:mod:`common.cli_settings`):
    what the fit fingerprint of :mod:`cspine.runs` hashes."""
    from common.cli_settings import parse_only

    return parse_only(Stage2CLI, CropClassifier, CropDataModule, args)
