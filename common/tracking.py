"""W&B logging settings shared by both stages' LightningCLIs.

The YAML configs give each stage a ``WandbLogger`` with ``offline: true``: runs are written to
disk and never uploaded unless asked (no machine of the project reaches the internet). When
``WANDB_MODE`` is set in the environment it decides instead — ``disabled`` (no run written, as
``make test`` sets), ``offline``, or ``online`` — for stage 1 and stage 2 alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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
