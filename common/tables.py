"""Reading the project's CSV tables with errors that name the file.

pandas reports a damaged CSV as ``Error tokenizing data``, ``No columns to parse from file`` or
a ``UnicodeDecodeError``, none of which says which file it was; :func:`read_csv` turns them into
one :class:`TableError` (a ``ValueError``) naming the path.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd


class TableError(ValueError):
    """A CSV file that cannot be read as a table (the message names the file)."""


def read_csv(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv(path, **kwargs)``; a missing file stays ``FileNotFoundError``, a file
    that is not a readable CSV table raises :class:`TableError` naming ``path``."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: empty file, not a CSV table") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{path}: not a readable CSV table ({first})") from None
