"""``cspine folds DATA_DIR --out folds.csv``: make the shared CV folds once, then reuse them."""

from __future__ import annotations

import argparse
import sys

NAME = "folds"
HELP = "write the stratified CV folds of DATA_DIR/train.csv (made once, reused afterwards)"
DESCRIPTION = (
    "Assign every study of DATA_DIR/train.csv to a fold, stratified by its C1..C7 label pattern "
    "(rare patterns pooled), and write StudyInstanceUID,fold to OUT. When OUT exists it is "
    "checked against train.csv and reused unchanged (delete it to re-split). Both stages read "
    "this file. Prints the per-fold study count and prevalence.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", metavar="DATA_DIR", help="RSNA-layout folder with train.csv")
    parser.add_argument("--out", required=True, metavar="FOLDS.csv",
                        help="folds CSV to create or reuse, conventionally $WORK/folds.csv")
    parser.add_argument("--n-folds", type=int, default=5, help="number of folds")
    parser.add_argument("--seed", type=int, default=42, help="split seed (used only on creation)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.dataset import DatasetError, RSNADataset
    from common.folds import FoldsError, ensure_folds, fold_balance

    out = Path(args.out)
    existed = out.exists()
    try:
        labels = RSNADataset(args.data_dir).labels
        folds = ensure_folds(labels, out, n_folds=args.n_folds, seed=args.seed)
    except (DatasetError, FoldsError) as err:
        print(f"cspine folds: error: {err}", file=sys.stderr)
        return 2
    print(f"{'reused' if existed else 'wrote'} {out}: {len(folds)} studies, {args.n_folds} folds")
    print(fold_balance(labels, folds).round(3).to_string())
    return 0
