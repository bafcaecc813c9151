"""Stage-1 speed on this machine: prepare throughput (cold vs warm) and inference per study.

* prepare: every study of ``--data`` onto the ``--grid`` model grid in a fresh work folder
  (cold), then again over the same folder (warm: every study is skipped). The resume
  requirement is warm ≥ 10× faster than cold.
* inference: one study at the model grid through the ``configs/stage1/<profile>.yaml`` network
  (random weights: speed does not depend on them), with and without the left/right flip TTA,
  plus cleaning (largest component per vertebra) and mapping the mask back to a 512×512×300 CT.

    python benchmarks/stage1.py --data data/synth_demo --grid 128 --jobs 2 --threads 2

Writes a Markdown table to ``benchmarks/results/stage1.md`` (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def bench_prepare(data: Path, grid: int, jobs: int) -> dict[str, float]:
    from stage1_segment.prepare import GridSettings, prepare_studies

    settings = GridSettings(shape=(grid, grid, grid))
    work = Path(tempfile.mkdtemp(prefix="stage1_bench_"))
    try:
        t0 = time.perf_counter()
        qc = prepare_studies(data, work, settings, jobs=jobs, progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        qc2 = prepare_studies(data, work, settings, jobs=jobs, progress=False)
        warm = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(qc)
    return {"studies": n, "failed": int((qc["status"] == "failed").sum()),
            "cached_2nd": int((qc2["status"] == "cached").sum()),
            "cold_s": cold, "warm_s": warm, "cold_rate": n / cold, "warm_rate": n / warm,
            "ratio": cold / warm}


def build_net(profile: str, grid: int):
    import yaml
    from jsonargparse import ArgumentParser

    from stage1_segment.module import Stage1Module

    cfg = yaml.safe_load((REPO / "configs" / "stage1" / f"{profile}.yaml").read_text())
    net_cfg = cfg["model"]["net"]
    net_cfg["init_args"]["out_channels"] = 8
    parser = ArgumentParser()
    parser.add_argument("--net", type=torch.nn.Module)
    net = parser.instantiate_classes(parser.parse_object({"net": net_cfg})).net
    return Stage1Module(net=net, grid_shape=[grid] * 3).eval()


def bench_inference(profile: str, grid: int, repeats: int) -> dict[str, float]:
    from common import geometry
    from stage1_segment.inference import largest_components, predict_on_grid

    model = build_net(profile, grid)
    hu = np.random.default_rng(0).integers(-1000, 1500, (grid,) * 3).astype(np.int16)
    out: dict[str, float] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    for tta in (False, True):
        predict_on_grid(model, hu, tta_flip_lr=tta, clean=False)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict_on_grid(model, hu, tta_flip_lr=tta, clean=False)
            times.append(time.perf_counter() - t0)
        out[f"forward_tta{int(tta)}_s"] = statistics.median(times)
    mask = np.zeros((grid,) * 3, np.uint8)
    for i in range(7):  # seven blobs plus noise voxels to clean
        z = grid // 8 + i * grid // 9
        mask[grid // 3: 2 * grid // 3, grid // 3: 2 * grid // 3, z: z + grid // 12] = i + 1
    mask[::17, ::19, ::23] = 3
    t0 = time.perf_counter()
    clean = largest_components(mask)
    out["clean_s"] = time.perf_counter() - t0
    ct_affine = geometry.affine_from_dicom([1, 0, 0, 0, 1, 0], [0.33, 0.33], [0, 0, 0], 0.625)
    grid_affine = geometry.grid_for_shape(ct_affine, (512, 512, 300), (grid,) * 3)
    t0 = time.perf_counter()
    geometry.map_labels_to_grid(clean, grid_affine, ct_affine, (512, 512, 300))
    out["map_back_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synth_demo")
    parser.add_argument("--grid", type=int, default=128, help="prepare grid (voxels per axis)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stage1.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    p = bench_prepare(args.data, args.grid, args.jobs)
    inf = {(prof, g): bench_inference(prof, g, args.repeats)
           for prof, g in (("base", 128), ("cpu", 64))}
    lines = [
        "# Stage 1 benchmark", "",
        f"`python benchmarks/stage1.py --data {args.data} --grid {args.grid} --jobs {args.jobs} "
        f"--threads {args.threads}` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after on "
        f"{os.cpu_count()} CPUs (above the CPU count = other jobs shared the cores).",
        "", "## Prepare (DICOM → model-grid cache)", "",
        "| studies | failed | grid | cold s | cold studies/s | warm s | warm studies/s | cold/warm |",
        "|---|---|---|---|---|---|---|---|",
        f"| {p['studies']} | {p['failed']} | {args.grid}³ | {p['cold_s']:.1f} | "
        f"{p['cold_rate']:.2f} | {p['warm_s']:.2f} | {p['warm_rate']:.0f} | {p['ratio']:.0f}× |",
        "", "## Inference per study (CPU, random weights)", "",
        "| profile | grid | params (M) | forward s | forward + L/R flip TTA s | clean s | "
        "map back to 512×512×300 s |", "|---|---|---|---|---|---|---|"]
    for (prof, g), r in inf.items():
        lines.append(f"| {prof} | {g}³ | {r['params_m']:.2f} | {r['forward_tta0_s']:.2f} | "
                     f"{r['forward_tta1_s']:.2f} | {r['clean_s']:.2f} | {r['map_back_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
