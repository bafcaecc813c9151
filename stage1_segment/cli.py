"""LightningCLI entry of stage 1: ``python -m stage1_segment fit|validate|test -c CONFIG``.

Conventions (STYLE.md §2):

* subcommand first, then ``-c configs/stage1/<profile>.yaml`` (repeatable, later wins) and
  ``--section.key value`` overrides; the data and work roots come as flags
  (``--data.data_root $(DATA) --data.work_dir $(WORK)``);
* values that must agree are linked, not typed twice: the grid, HU window, patch size and
  thoracic mode go from ``data`` to ``model`` (so they land in the checkpoint), the class count
  from ``data.thoracic`` to ``model.num_classes`` and the network's ``out_channels``, and the
  checkpoint folder from ``data.work_dir`` (``$WORK/stage1/checkpoints``);
* a ``checkpoint`` group configures ``ModelCheckpoint`` (best by ``val/dice_mean`` plus
  ``last.ckpt``; resume with ``--ckpt_path last``); a ``crops`` group holds the settings of
  ``make crops`` so one YAML describes the whole stage;
* there is no ``predict`` subcommand: every prediction goes through the one test-time engine
  (:mod:`cspine.engine`: ``make crops``, ``make submit``, ``cspine predict``);
* W&B: the YAML's ``WandbLogger`` is offline; if ``WANDB_MODE`` is set in the environment it
  decides instead (``disabled`` in tests, ``online`` to upload). Its files go to
  ``$WORK/stage1`` unless ``save_dir`` is given. The resolved config is written beside the
  logs (never overwriting an earlier one) and sent to the logger, on rank 0 only.
"""

from __future__ import annotations

from typing import Sequence

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from common.checkpoints import add_checkpoint_group
from common.labels import num_classes
from common.layout import WorkLayout
from common.tracking import RunConfigCallback
from stage1_segment.crops import CropConfig
from stage1_segment.data import Stage1DataModule
from stage1_segment.module import Stage1Module

#: data → model links: settings the checkpoint must carry for inference.
LINKED_TO_MODEL = ("hu_window", "grid_shape", "grid_spacing_mm", "patch_size", "thoracic")


def checkpoint_dir(work_dir: str) -> str:
    """``$WORK/stage1/checkpoints``: fixed, so ``--ckpt_path last`` finds the previous run."""
    return str(WorkLayout(work_dir).stage1_checkpoints)


class Stage1CLI(LightningCLI):
    """LightningCLI with the stage-1 links, checkpoint and crop groups (module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        add_checkpoint_group(parser, "val/dice_mean", "max",
                             "epoch{epoch:03d}-dice{val/dice_mean:.4f}")
        parser.link_arguments("data.work_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("data.thoracic", "model.num_classes", compute_fn=num_classes)
        parser.link_arguments("data.thoracic", "model.net.init_args.out_channels",
                              compute_fn=num_classes)
        for key in LINKED_TO_MODEL:
            parser.link_arguments(f"data.{key}", f"model.{key}")
        parser.add_class_arguments(CropConfig, "crops")
        # one key each: crops load the studies as the data section says, with its folds
        parser.link_arguments("data.lenient", "crops.lenient")
        parser.link_arguments("data.n_folds", "crops.n_folds")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (prediction runs through :mod:`cspine.engine`)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def after_fit(self) -> None:
        """Validate the best checkpoint and record the run in ``$WORK/stage1/run.json``."""
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        if trainer.fast_dev_run or ckpt is None:
            return
        metrics = trainer.validate(self.model, datamodule=self.datamodule,
                                   ckpt_path=ckpt.best_model_path or None, verbose=False)
        if trainer.is_global_zero:
            from common.run_record import write_run_record

            config = self.config[self.subcommand]
            best = ckpt.best_model_path or ckpt.last_model_path
            write_run_record(
                WorkLayout(config.data.work_dir).stage1, "stage1", checkpoint=best,
                best_checkpoint=best, last_checkpoint=ckpt.last_model_path,
                monitor=ckpt.monitor, best_score=ckpt.best_model_score,
                epochs=trainer.current_epoch,
                metrics={k: round(float(v), 4) for k, v in (metrics[0] if metrics else {}).items()},
                config=yaml_safe(self.parser.dump(self.config, skip_none=False)))

    def before_instantiate_classes(self) -> None:  # noqa: D102
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.trainer.get("default_root_dir"):  # logger-less runs: configs in $WORK too
            config.trainer.default_root_dir = str(WorkLayout(config.data.work_dir).stage1)
        from common.tracking import apply_wandb_settings

        apply_wandb_settings(config.trainer, WorkLayout(config.data.work_dir).stage1)


def yaml_safe(text: str) -> dict:
    """A dumped config as plain data (for JSON records)."""
    import yaml

    return yaml.safe_load(text)


def main(args: Sequence[str] | None = None, run: bool = True) -> Stage1CLI:
    """Run the stage-1 LightningCLI (``args`` as on the command line; None = sys.argv)."""
    return Stage1CLI(Stage1Module, Stage1DataModule, args=args, run=run,
                     save_config_callback=RunConfigCallback,
                     parser_kwargs={"description": "Stage 1: C1–C7 segmentation (MONAI 3D "
                                    "network, LightningCLI). Use `fit -c configs/stage1/"
                                    "cpu.yaml --data.data_root DATA --data.work_dir WORK`."})


def parse_settings(args: Sequence[str]):
    """The stage-1 config for ``args`` (``-c`` files and ``--section.key`` overrides, no
    subcommand), read through this LightningCLI's own parser (:mod:`common.cli_settings`):
    what ``make stage1-prepare``, ``make crops`` and the fit fingerprint use."""
    from common.cli_settings import parse_only

    return parse_only(Stage1CLI, Stage1Module, Stage1DataModule, args)
