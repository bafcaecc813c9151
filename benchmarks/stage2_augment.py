"""Stage-2 augmentation cost: the batched ``BatchAugment`` against per-crop MONAI transforms.

Baseline: the per-crop MONAI dictionary pipeline stage 2 used before (``RandAffined`` on image,
maps and mask, ``RandFlipd``, intensity scale/shift, Gaussian noise), applied crop by crop as a
DataLoader worker would. Candidate: ``stage2_classify.augment.BatchAugment`` on the collated
batch (one ``affine_grid``, trilinear ``grid_sample`` for image + maps, nearest for masks). Same
parameters, random data of the demo crop shape (1 window + 2 maps + 2 masks), CPU; prints a
Markdown table with the ratio.

    python benchmarks/stage2_augment.py --threads 1 --batch 16 --shape 48 48 20
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np
import torch


def monai_per_crop(prob: float) -> Callable[[dict], dict]:
    """The per-crop MONAI pipeline (the baseline)."""
    from monai.data import set_track_meta
    from monai.transforms import (
        Compose,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    set_track_meta(False)
    rad = float(np.deg2rad(10.0))
    keys = ("image", "maps", "mask")
    return Compose([
        RandAffined(keys=keys, prob=prob, rotate_range=(rad,) * 3, scale_range=(0.1,) * 3,
                    translate_range=(2.0,) * 3, mode=("bilinear", "bilinear", "nearest"),
                    padding_mode="zeros"),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.5),
    ]).set_random_state(seed=0)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one worker)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 48, 20], metavar=("X", "Y", "Z"))
    ap.add_argument("--prob", type=float, default=0.7, help="share of crops given the affine")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from stage2_classify.augment import BatchAugment

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, shape = args.batch, tuple(args.shape)
    batch = {"image": torch.rand(b, 1, *shape), "maps": torch.rand(b, 2, *shape),
             "mask": (torch.rand(b, 2, *shape) > 0.5).float()}
    crops = [{k: v[i] for k, v in batch.items()} for i in range(b)]
    per_crop = monai_per_crop(args.prob)
    batched = BatchAugment(prob=args.prob)
    base = timed(lambda: [per_crop(dict(c)) for c in crops], args.repeats)
    new = timed(lambda: batched(dict(batch)), args.repeats)
    print(f"| augmentation of {b} crops {shape}, 5 channels, {args.threads} thread(s) | "
          "ms per batch |\n|---|---|")
    print(f"| MONAI per crop (RandAffined, RandFlipd, intensity, noise) | {base * 1e3:.1f} |")
    print(f"| BatchAugment (batched affine_grid + grid_sample) | {new * 1e3:.1f} |")
    print(f"| ratio (per crop / batched) | {base / new:.2f}× |")


if __name__ == "__main__":
    main()
