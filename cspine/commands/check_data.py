"""``cspine check-data DATA_DIR``: census and validation of a whole RSNA-layout folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

NAME = "check-data"
HELP = "census and validation of an RSNA-layout folder (headers only by default) -> CSV"
DESCRIPTION = (
    "Scan every study folder under DATA_DIR/train_images and DATA_DIR/test_images (headers only, "
    "no pixel decoding unless --decode) and write one CSV row per study: split, status, reason "
    "codes, files, slices, image size, pixel spacing, slice thickness, z step (from positions), "
    "orientation letters, z direction of the file numbering, tilt, transfer syntaxes, decoder. "
    "status: ok | warned (loads strictly, with skipped files) | recoverable (strict rejects, "
    "--lenient repairs) | rejected (unreadable) | missing (listed in a CSV, no folder). Studies "
    "in train.csv/test.csv without a folder and folders absent from the CSVs are reported. "
    "Exit 0 when the folder is usable (RSNA layout, at least one readable study) even if some "
    "studies are flagged; 1 when nothing is readable; 2 when DATA_DIR is not an RSNA layout.")

STATUS_ORDER = ("ok", "warned", "recoverable", "rejected", "missing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", metavar="DATA_DIR",
                        help="RSNA-layout folder (train_images/, test_images/, train.csv, ...)")
    parser.add_argument("--out", default="qc_data.csv", metavar="QC.csv",
                        help="census CSV to write (atomically)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes over studies (default: min(2, CPU count))")
    parser.add_argument("--decode", action="store_true",
                        help="also decode every study (lenient) to check pixels and HU range")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N studies per split (quick look)")


def census_study(job: tuple[str, str, bool]) -> dict[str, Any]:
    """One CSV row: the header census of a study folder, plus a lenient decode if asked."""
    from common.dicom_io import SeriesError, load_series, scan_series

    path, split, decode = job
    row: dict[str, Any] = {"split": split}
    try:
        row.update(scan_series(path))
    except Exception as exc:  # noqa: BLE001 - one bad study never stops the census
        row.update(study=Path(path).name, status="rejected", reasons="internal_error",
                   error=f"{type(exc).__name__}: {exc}")
    if decode and row.get("status") != "rejected":
        try:
            vol = load_series(path, lenient=True, workers=1)
            row.update(decode_status=vol.qc["status"], hu_min=vol.qc["hu_min"],
                       hu_max=vol.qc["hu_max"], decode_s=vol.qc["timings"]["total_s"],
                       decoder=vol.qc["decoder"])
        except SeriesError as err:
            row.update(decode_status="rejected", status="rejected",
                       reasons=";".join(filter(None, [row.get("reasons", ""), err.reason])),
                       error=str(err))
    return row


def _jobs(root: Path, decode: bool, limit: int | None) -> list[tuple[str, str, bool]]:
    jobs = []
    for split in ("train", "test"):
        folder = root / f"{split}_images"
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir()
                           if p.is_dir() and not p.name.startswith("."))
            jobs += [(str(folder / n), split, decode) for n in names[:limit]]
    return jobs


def _layout_problems(root: Path) -> list[dict[str, Any]]:
    from common.dataset import DatasetError, RSNADataset
    from common.tables import TableError

    try:
        problems = RSNADataset(root).problems()
    except (DatasetError, TableError) as err:  # e.g. a train.csv that is not a table
        return [{"kind": "dataset_error", "study": "-", "detail": str(err)}]
    return [{"kind": p.kind, "study": p.study, "detail": p.detail} for p in problems]


def _summary(frame, problems: list[dict[str, Any]]) -> str:
    from collections import Counter

    from common import decoders

    lines = [f"{len(frame)} studies"]
    by = frame.groupby(["split", "status"]).size().unstack(fill_value=0)
    by = by[[c for c in STATUS_ORDER if c in by.columns]]
    lines.append(by.to_string())
    reasons: Counter = Counter()
    for r in frame.get("reasons", []).fillna(""):
        reasons.update(x for x in str(r).split(";") if x)
    if reasons:
        lines.append("reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    ts: Counter = Counter()
    for cell in frame.get("transfer_syntaxes", []).fillna(""):
        for part in str(cell).split(";"):
            if ":" in part:
                uid, n = part.rsplit(":", 1)
                ts[uid] += int(n)
    if ts:
        lines.append("transfer syntaxes (files): " + ", ".join(
            f"{k} {v}" for k, v in ts.most_common()))
    lines.append(f"decoder in use: {decoders.summary()}")
    kinds = Counter(p["kind"] for p in problems)
    if kinds:
        lines.append("layout: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
        for p in problems[:10]:
            lines.append(f"  {p['kind']}: {p['study']}: {p['detail']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm import tqdm

    from common.atomic import check_writable, write_csv
    from common.dicom_decode import default_workers, mp_context

    check_writable(args.out)  # before the scan: an unwritable --out must not waste it
    root = Path(args.data_dir)
    if not root.is_dir() or not any((root / d).is_dir() for d in ("train_images",
                                                                    "test_images")):
        print(f"cspine check-data: error: {root} is not an RSNA-layout folder (no train_images/ "
              "or test_images/)", file=sys.stderr)
        return 2
    problems = _layout_problems(root)  # first: a broken table is reported without waiting
    for p in problems:
        if p["kind"] == "dataset_error":
            print(f"cspine check-data: warning: {p['detail']}", file=sys.stderr)
    jobs = _jobs(root, args.decode, args.limit)
    workers = default_workers() if args.workers is None else max(1, args.workers)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="check-data", unit="study")
    if workers > 1 and len(jobs) > 4:
        from concurrent.futures import ProcessPoolExecutor

        from common.procs import pool_initializer

        init, initargs = pool_initializer()

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp_context(),
                                 initializer=init, initargs=initargs) as pool:
            for row in pool.map(census_study, jobs, chunksize=4):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(census_study(job))
            bar.update()
    bar.close()
    for p in problems:
        if p["kind"] in ("label_without_folder", "test_listed_without_folder"):
            rows.append({"split": "train" if p["kind"].startswith("label") else "test",
                         "study": p["study"], "status": "missing", "reasons": p["kind"],
                         "error": p["detail"]})
    unlisted = {p["study"] for p in problems
                if p["kind"] in ("folder_without_label", "test_folder_not_listed")}
    for row in rows:
        if row["status"] != "missing":
            row["listed"] = "no" if row.get("study") in unlisted else "yes"
    frame = pd.DataFrame(rows)
    first = ["split", "study", "status", "reasons"]
    frame = frame.reindex(columns=first + [c for c in frame.columns if c not in first])
    for col in ("n_files", "n_skipped", "n_slices", "rows", "cols", "first_file", "last_file"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    write_csv(args.out, frame)
    print(_summary(frame, problems))
    print(f"wrote {args.out}")
    readable = frame["status"].isin(["ok", "warned", "recoverable"]).sum()
    if readable == 0:
        print("cspine check-data: error: no readable study", file=sys.stderr)
        return 1
    return 0
