"""Which pixel decoder pydicom uses for each transfer syntax, chosen once and made visible.

pydicom 3 ships decoder *plugins*; for JPEG Lossless (1.2.840.10008.1.2.4.70) and JPEG 2000 both
``gdcm`` (python-gdcm) and ``pylibjpeg`` (pylibjpeg-libjpeg / -openjpeg) can decode. python-gdcm
decodes JPEG Lossless about 2× faster here (DICOM_PITFALLS.md §4), so it is preferred where it is
installed. Uncompressed syntaxes need no plugin (pydicom's native path), RLE uses pydicom's own.

The choice can be forced with the environment variable ``CSPINE_DECODER`` (``gdcm``,
``pylibjpeg`` or ``auto``), e.g. to compare decoders or to reproduce a fallback. The plugin
actually used is written into each study's QC record (``decoder``) and printed by
``cspine check-data``.
"""

from __future__ import annotations

import importlib.metadata
import os
from functools import lru_cache

#: Plugin preference, fastest first (DICOM_PITFALLS.md §4).
PREFERENCE: tuple[str, ...] = ("gdcm", "pylibjpeg", "pydicom", "pillow")
#: The package to install when a syntax has no decoder, by plugin name.
PACKAGE_HINT = {
    "gdcm": "python-gdcm",
    "pylibjpeg": "pylibjpeg with pylibjpeg-libjpeg (JPEG) or pylibjpeg-openjpeg (JPEG 2000)",
    "pillow": "pillow",
    "pydicom": "pydicom",
}
_DIST = {"gdcm": "python-gdcm", "pylibjpeg": "pylibjpeg", "pillow": "pillow",
         "pydicom": "pydicom"}


class MissingCodecError(RuntimeError):
    """No installed plugin can decode a transfer syntax."""


def _forced() -> str:
    value = os.environ.get("CSPINE_DECODER", "auto").strip().lower()
    return "" if value in ("", "auto") else value


def choose_plugin(transfer_syntax_uid: str) -> str:
    """The pydicom decoding plugin to use for a transfer syntax.

    Returns:
        ``""`` for uncompressed syntaxes (pydicom's native path), else a plugin name such as
        ``"gdcm"`` or ``"pylibjpeg"``.

    Raises:
        MissingCodecError: the syntax is compressed and no installed plugin can decode it (or
            the plugin forced by ``CSPINE_DECODER`` is unavailable); the message names the
            transfer syntax and the package to install.
    """
    return _choose(str(transfer_syntax_uid), _forced())


@lru_cache(maxsize=None)
def _choose(transfer_syntax_uid: str, forced: str) -> str:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax_uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise MissingCodecError(f"no pydicom decoder exists for transfer syntax {uid} "
                                f"({uid.name})") from exc
    if not uid.is_compressed:
        return ""
    available = tuple(decoder.available_plugins)
    if forced:
        if forced in available:
            return forced
        raise MissingCodecError(
            f"CSPINE_DECODER={forced} cannot decode {uid} ({uid.name}); available: "
            f"{list(available) or 'none'}; install {PACKAGE_HINT.get(forced, forced)}")
    for name in PREFERENCE:
        if name in available:
            return name
    if available:
        return available[0]
    wanted = sorted(getattr(decoder, "missing_dependencies", []) or [])
    raise MissingCodecError(
        f"transfer syntax {uid} ({uid.name}) has no installed decoder; install python-gdcm or "
        f"{PACKAGE_HINT['pylibjpeg']}" + (f" (pydicom reports: {wanted})" if wanted else ""))


def plugin_label(plugin: str) -> str:
    """Human-readable name and version of a plugin, e.g. ``"gdcm 3.2.6"``."""
    if plugin == "":
        return "native"
    dist = _DIST.get(plugin, plugin)
    try:
        return f"{plugin} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return plugin


def describe(transfer_syntaxes: list[str] | tuple[str, ...]) -> str:
    """One line naming the decoder chosen for each transfer syntax, for QC records and logs.

    Example: ``"1.2.840.10008.1.2.4.70=gdcm 3.2.6"``; ``"<uid>=missing"`` when none is available.
    """
    parts = []
    for ts in sorted(set(transfer_syntaxes)):
        try:
            parts.append(f"{ts}={plugin_label(choose_plugin(ts))}")
        except MissingCodecError:
            parts.append(f"{ts}=missing")
    return "; ".join(parts)


def summary() -> str:
    """The decoder pydicom will use for the common compressed syntaxes (for ``check-data``)."""
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

    names = {JPEGLosslessSV1: "JPEG-LL", JPEG2000Lossless: "J2K", RLELossless: "RLE"}
    parts = []
    for uid, short in names.items():
        try:
            parts.append(f"{short}: {plugin_label(choose_plugin(uid))}")
        except MissingCodecError:
            parts.append(f"{short}: MISSING")
    return ", ".join(parts)
