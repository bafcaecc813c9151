"""``cspine``: one command, one sub-command per module in :mod:`cspine.commands`.

Each module in ``cspine/commands/`` defines ``NAME`` (the sub-command, e.g. ``"check-data"``),
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). A
module with ``OVERRIDES = True`` also takes a stage's ``--section.key value`` overrides (any
arguments argparse does not know), read by the stage's own parser, in ``args.overrides``.
Modules are imported lazily at parse time, so heavy imports (torch) only happen for the
sub-command that needs them: keep module-level imports in command modules light.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

import cspine.commands as commands_pkg


def _command_modules() -> list:
    mods = []
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"{commands_pkg.__name__}.{info.name}"))
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspine",
        description="Cervical-spine fracture detection on CT (RSNA 2022 layout): data checks, "
                    "conversion, synthetic data, scoring and single-study prediction.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _overrides=bool(getattr(mod, "OVERRIDES", False)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspine`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
    except expected_errors() as err:  # bad input, bad path, disk full, permission: one line
        if args.debug:
            raise
        text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
        print(f"cspine {args.command}: error: {text or type(err).__name__} "
              f"({type(err).__name__}; --debug shows the traceback)", file=sys.stderr)
        return 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a command turns into one line and exit status 2 (anything else is a bug and
    keeps its traceback): OS errors (missing or unwritable paths, a full disk, permissions),
    value errors (bad input: ``SeriesError``, ``GeometryError``, malformed CSVs), runtime errors
    (``PredictError``), files that are not checkpoints (unpickling and zip errors), truncated
    compressed files, and nibabel's unreadable images."""
    import pickle
    import zipfile

    out: list[type[BaseException]] = [OSError, ValueError, RuntimeError, EOFError, MemoryError,
                                      pickle.UnpicklingError, zipfile.BadZipFile]
    try:
        from nibabel.filebasedimages import ImageFileError

        out.append(ImageFileError)
    except ImportError:
        pass
    return tuple(out)


if __name__ == "__main__":
    raise SystemExit(main())
