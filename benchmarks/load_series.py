"""Benchmark: DICOM series → HU volume, our loader against a plain pydicom loop and SimpleITK.

Usage::

    .venv/bin/python benchmarks/load_series.py [--slices 300] [--repeats 3] [--workers 2]
    .venv/bin/python benchmarks/load_series.py --rss           # peak RSS of a 1,082-slice load

The first run writes a synthetic 512² CT series (signed int16, intercept -1024, 0.625 mm
slices) twice under ``work/bench/`` (ignored by git): uncompressed Explicit VR Little Endian and
JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, encoded with python-gdcm by
``common.synth.writer``); later runs reuse it. Each reader runs once to warm the page cache
(and our worker pool), then ``--repeats`` interleaved rounds; the table reports medians:

* ``cspine load_series``: header scan, validation, decode in ``--workers`` processes, int16.
* ``pydicom loop``: one process; ``dcmread`` + ``pixel_array`` (pydicom's default plugin order,
  which picks gdcm when installed), sort by position on the normal, rescale to float32;
  ``pydicom loop, pylibjpeg``: the same with pylibjpeg forced (what runs without python-gdcm).
* ``SimpleITK``: ``ImageSeriesReader`` (GDCM inside; rescaled float32 output).

Every reader's volume is checked against ours before timing counts. ``CPU s`` is the CPU time of
the reader (for ours: the loader plus its worker processes), a check on wall times taken while
other processes share the machine. The markdown table goes to
stdout and to ``benchmarks/results/load_series.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "work" / "bench"
RESULTS = REPO / "benchmarks" / "results" / "load_series.md"
UID = "1.2.826.0.1.3680043.990300"


def phantom(n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """A neck-like int16 HU volume (X, Y, Z): air, soft tissue, a bony ring, with CT noise."""
    rng = np.random.default_rng(seed)
    c = np.arange(size) - size / 2
    xx, yy = np.meshgrid(c, c, indexing="ij")
    hu = np.empty((size, size, n), dtype=np.int16)
    for k in range(n):
        r = 1.0 + 0.1 * np.sin(k / 40)
        body = (xx / (170 * r)) ** 2 + (yy / (130 * r)) ** 2 < 1
        rad = np.hypot(xx, yy - 40)
        bone = (rad > 18) & (rad < 32)
        marrow = rad <= 18
        sl = np.where(body, 40.0, -1000.0) + rng.normal(0, 18, (size, size))
        sl[bone] = 900 + rng.normal(0, 60, int(bone.sum()))
        sl[marrow] = 250 + rng.normal(0, 40, int(marrow.sum()))
        hu[:, :, k] = np.clip(np.rint(sl), -1024, 3000)
    return hu


def make_series(n: int, jpeg: bool) -> Path:
    """Write (once) the n-slice series, uncompressed or JPEG-LL, and return its folder."""
    from common import geometry
    from common.synth.writer import write_series

    folder = BENCH / f"series_{n}_{'jpll' if jpeg else 'raw'}" / UID
    done = folder.parent / ".complete"
    if done.exists():
        return folder
    print(f"writing {folder} (once) ...", file=sys.stderr)
    hu = phantom(n)
    affine = geometry.affine_from_dicom((1, 0, 0, 0, 1, 0), (0.332, 0.332), (-85.0, -85.0, 0.0),
                                        0.625)
    write_series(folder, UID, hu, affine, np.arange(n, 0, -1), 0.332, 0.625, jpeg=jpeg)
    done.write_text("ok\n")
    return folder


def read_cspine(folder: Path, workers: int) -> np.ndarray:
    from common.dicom_io import load_series

    return load_series(folder, workers=workers).hu


def read_pydicom(folder: Path, plugin: str = "") -> np.ndarray:
    """The plain single-process loop most notebooks use (sorted by position, float32 HU).

    ``plugin`` forces a decoder for compressed files (``""``: pydicom's default order).
    """
    import pydicom

    from common import geometry

    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    if plugin and dss[0].file_meta.TransferSyntaxUID.is_compressed:
        for d in dss:
            d.pixel_array_options(decoding_plugin=plugin)
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    order = geometry.sort_slices(pos, [float(v) for v in dss[0].ImageOrientationPatient])
    vol = np.empty((len(dss), dss[0].Rows, dss[0].Columns), dtype=np.float32)
    for k, i in enumerate(order):
        d = dss[i]
        vol[k] = d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(
            d.RescaleIntercept)
    return geometry.stack_to_xyz(vol)


def read_sitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute()).T


def _pool_cpu() -> float:
    """CPU seconds used so far by the decode pool's worker processes (Linux /proc)."""
    from common import dicom_decode

    pool = dicom_decode._POOL
    total = 0.0
    for pid in (pool._processes if pool is not None else {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _versions() -> str:
    import importlib.metadata as md

    names = ("pydicom", "python-gdcm", "pylibjpeg-libjpeg", "SimpleITK", "numpy")
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def benchmark(n: int, repeats: int, workers: int) -> str:
    from common import decoders
    from common.dicom_decode import shutdown_pool

    folders = {"uncompressed": make_series(n, jpeg=False), "JPEG-LL": make_series(n, jpeg=True)}
    readers = {f"cspine load_series, {workers} workers": lambda f: read_cspine(f, workers),
               "cspine load_series, 1 process": lambda f: read_cspine(f, 1),
               "pydicom loop": read_pydicom,
               "pydicom loop, pylibjpeg": lambda f: read_pydicom(f, "pylibjpeg"),
               "SimpleITK": read_sitk}
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for syntax, folder in folders.items():
        reference = read_cspine(folder, workers)  # warm-up; also the reference volume
        for name, fn in readers.items():
            vol = fn(folder)
            # pydicom/SimpleITK keep values below -1024; ours maps them to -1024 by design
            if not np.array_equal(np.maximum(vol, -1024), reference):
                raise AssertionError(f"{name} on {syntax}: volume differs from cspine's")
            del vol
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for syntax, folder in folders.items():
            for name, fn in readers.items():
                c0, t0 = time.process_time() + _pool_cpu(), time.perf_counter()
                fn(folder)
                times.setdefault((name, syntax), []).append(time.perf_counter() - t0)
                cpu.setdefault((name, syntax), []).append(
                    time.process_time() + _pool_cpu() - c0)
    shutdown_pool()
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    lines = [
        f"Series: {n} slices of 512x512 int16 (synthetic CT); medians of {repeats} interleaved "
        f"rounds after a warm-up; {os.cpu_count()} CPUs, load average {load_before:.1f} before "
        f"/ {load_after:.1f} after (other processes share the CPUs); cspine workers = {workers}; "
        f"decoder: {decoders.summary()}; {platform.python_version()}, {_versions()}.", "",
        "| reader | syntax | seconds | slices/s | vs pydicom loop | vs SimpleITK | CPU s |",
        "|---|---|---|---|---|---|---|"]
    for syntax in folders:
        for name in readers:
            s = med[(name, syntax)]
            lines.append(
                f"| {name} | {syntax} | {s:.2f} | {n / s:.0f} | "
                f"{med[('pydicom loop', syntax)] / s:.2f}x | {med[('SimpleITK', syntax)] / s:.2f}x | "
                f"{med_cpu[(name, syntax)]:.2f} |")
    return "\n".join(lines)


def rss(n: int, workers: int) -> str:
    """Peak RSS of loading an n-slice 512² uncompressed series, measured in a fresh process."""
    folder = make_series(n, jpeg=False)
    code = (
        "import resource, time\n"
        "from common.dicom_io import load_series\n"
        "from common import dicom_decode\n"
        "t = time.perf_counter()\n"
        f"v = load_series({str(folder)!r}, workers={workers})\n"
        "t = time.perf_counter() - t\n"
        "def hwm(pid):\n"
        "    for line in open(f'/proc/{pid}/status'):\n"
        "        if line.startswith('VmHWM'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "pool = dicom_decode._POOL\n"
        "kids = [hwm(p) for p in pool._processes] if pool is not None else []\n"
        "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(f'{v.hu.shape} = {v.hu.nbytes / 2**20:.0f} MiB int16 loaded in {t:.1f} s; "
        "peak RSS of the loader process {me:.0f} MiB; decode workers '\n"
        "      f'{[round(k) for k in kids]} MiB each (their volume pages are shared with the "
        "loader, /dev/shm)')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rss", action="store_true",
                        help="measure the peak RSS of loading a 1,082-slice series instead")
    args = parser.parse_args()
    if args.rss:
        print(rss(1082, args.workers))
        return
    table = benchmark(args.slices, args.repeats, args.workers)
    print(table)
    from common.atomic import write_text

    write_text(RESULTS, f"# load_series benchmark\n\n{table}\n")


if __name__ == "__main__":
    main()
