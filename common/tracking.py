"""W&B logging settings shared by both stages' LightningCLIs.

The YAML configs give each stage a ``WandbLogger`` with ``offline: true``: runs are written to
disk and never uploaded unless asked (no machine of the project reaches the internet). When
``WANDB_MODE`` is set in the environment it decides instead — ``disabled`` (no run written, as
``make test`` sets), ``offline``, or ``online`` — for stage 1 and stage 2 alike.

:class:`RunConfigCallback` is both stages' config record (one file per run, one W&B shape).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import SaveConfigCallback


def wandb_entries(trainer_config: Any) -> list[Any]:
    """The ``WandbLogger`` entries (``class_path`` / ``init_args`` namespaces) of a parsed
    ``trainer`` config section (one logger, a list of them, or none)."""
    logger = trainer_config.get("logger")
    entries = logger if isinstance(logger, list) else [logger]
    return [e for e in entries
            if hasattr(e, "class_path") and "WandbLogger" in str(e.class_path)]


def apply_wandb_settings(trainer_config: Any, default_save_dir: str | os.PathLike) -> None:
    """Give every ``WandbLogger`` of ``trainer_config`` a save folder (``default_save_dir`` when
    the config leaves it empty or ``.``; created) and let ``WANDB_MODE``, when set, override the
    YAML's ``offline`` flag (module docstring). Edits the parsed config in place, before the
    classes are instantiated."""
    for entry in wandb_entries(trainer_config):
        args = entry.init_args
        if not args.get("save_dir") or args.get("save_dir") == ".":
            args.save_dir = str(default_save_dir)
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        if os.environ.get("WANDB_MODE"):
            args.offline = False  # the environment decides (disabled / offline / online)


class RunConfigCallback(SaveConfigCallback):
    """Both stages' config record: the resolved config (after links and defaults) is written to
    ``<log dir>/configs/<stage>-<run id>.yaml`` — a new file per run, so a resumed fit never
    overwrites the first run's — and logged to every logger as its top-level sections
    (``model``, ``data``, ``trainer``, …: one W&B config shape for both stages), on rank 0."""

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        import time

        if not self.already_saved:
            logger = trainer.logger
            run = getattr(logger, "version", None) if trainer.is_global_zero and logger else None
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = getattr(stage, "value", stage)
            self.config_filename = os.path.join("configs", f"{name}-{run or stamp}.yaml")
            log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
            if trainer.is_global_zero and log_dir:
                Path(log_dir, "configs").mkdir(parents=True, exist_ok=True)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # noqa: D102 (rank 0 only)
        import yaml

        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved)
