"""A stage's settings read through its own LightningCLI parser, without building anything.

Every step of a stage (prepare, fit, crops for stage 1; fit for stage 2; the run fingerprints of
:mod:`cspine.runs`) reads its YAML files and ``--section.key value`` overrides through the one
jsonargparse parser the stage's LightningCLI builds. So ``-c a.yaml -c b.yaml --data.x 3``
means the same thing, with the same links, defaults and type checks, in every step.
"""

from __future__ import annotations

from typing import Any, Sequence


def parse_only(cli_class: type, model_class: type, datamodule_class: type,
               args: Sequence[str]) -> Any:
    """The parsed config (a jsonargparse ``Namespace``) of ``cli_class`` for ``args`` — the
    LightningCLI arguments without a subcommand, e.g. ``["-c", "cpu.yaml", "--data.x", "3"]``.
    Links and defaults are applied; nothing is instantiated and no seed is set.

    Raises:
        ValueError: an unknown key, a value of the wrong type, an unreadable config file (one
            line, naming the argument).
    """
    from jsonargparse import ArgumentError

    class ParseOnly(cli_class):  # type: ignore[misc, valid-type]
        def _set_seed(self) -> None:  # no global side effect from reading settings
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    import warnings

    try:
        with warnings.catch_warnings():  # args are given on purpose, beside the caller's argv
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            cli = ParseOnly(model_class, datamodule_class, args=list(args), run=False,
                            save_config_callback=None, parser_kwargs={"exit_on_error": False})
    except ArgumentError as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{cli_class.__name__} settings: {text[:400]}") from None
    return cli.config


def strip_keys(settings: dict[str, Any], drop: Sequence[str]) -> dict[str, Any]:
    """A copy of a nested settings dict without the dotted keys in ``drop`` (``"data.work_dir"``,
    ``"trainer.logger"``); missing keys are ignored."""
    import copy

    out = copy.deepcopy(settings)
    for dotted in drop:
        *path, last = dotted.split(".")
        node: Any = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(last, None)
    return out
