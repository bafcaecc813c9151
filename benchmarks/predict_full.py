"""Benchmark: one full-size study through the test-time engine, against the plain path.

Usage::

    .venv/bin/python benchmarks/predict_full.py                  # CPU (this machine: 2 cores)
    .venv/bin/python benchmarks/predict_full.py --rss            # + peak RSS of a 1,082-slice study
    .venv/bin/python benchmarks/predict_full.py --device cuda --batch 40   # on a GPU machine
    .venv/bin/python benchmarks/predict_full.py --dry-run        # every code path, tiny and fast

Set-up, cached under ``work/bench/predict_full/`` (ignored by git): one ``full``-preset synthetic
study (512² JPEG Lossless, ~0.36 mm slices) and the networks of ``configs/stage1/base.yaml`` and
``configs/stage2/base.yaml`` (UNet 32…320 at 128³ with the left-right flip; DenseNet121 3D on
96×96×64 crops with the flip) after one training step on the ``tiny`` preset (speed does not
depend on the weights), trained through each stage's own CLI.

Measured, each in the same run:

* **engine**: :class:`cspine.engine.StudyEngine` on the study (load with the decode pool,
  stage 1, boxes + crops, stage 2), one cold and ``--repeats`` warm rounds, medians;
* **plain**: the same networks run the straightforward way (:mod:`cspine.reference`: a decode
  loop in one process, float32 copies before every SciPy resampling, flips as separate forward
  passes, no ``inference_mode``), so the ratio is visible; the probabilities of both must agree
  to 1e-4;
* ``cspine predict`` as a command: wall time including Python start-up, its own step timings
  (overview included) and its peak RSS (``--rss``: also for a 1,082-slice study);
* **ONNX Runtime**: the same engine with the networks exported by
  ``cspine export-bundle --format onnx`` (:mod:`cspine.onnx_models`);
* with ``--batch N`` (a GPU machine): ``cspine submit`` over N copies of the study (decoding in
  ``--jobs`` processes overlapped with the networks on the device): studies per minute and the
  GPU utilisation sampled by ``nvidia-smi``.

The markdown table goes to stdout and to ``benchmarks/results/predict_full_<device>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "work" / "bench" / "predict_full"
PY = sys.executable


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def make_models(root: Path, dry: bool) -> tuple[Path, Path, Path]:
    """(WORK with both stages' checkpoints and crop settings, stage-1 ckpt, stage-2 ckpt)."""
    work = root / ("work_dry" if dry else "work")
    s1 = work / "stage1" / "checkpoints" / "last.ckpt"
    s2 = work / "stage2" / "fold0" / "run.json"
    if s1.is_file() and s2.is_file():
        return work, s1, Path(json.loads(s2.read_text())["checkpoint"])
    shutil.rmtree(work, ignore_errors=True)  # an interrupted set-up starts again
    tiny = root / "tiny"
    _run([PY, "-m", "cspine", "synth", str(tiny), "--preset", "tiny", "--no-progress"])
    cfg1 = ["-c", "configs/stage1/base.yaml"]
    cfg2 = ["-c", "configs/stage2/base.yaml"]
    if dry:
        (root / "dry1.yaml").write_text("data:\n  grid_shape: [32, 32, 32]\ncrops:\n"
                                        "  shape: [32, 32, 32]\n")
        cfg1 += ["-c", str(root / "dry1.yaml")]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger",
           "false", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
           "--data.num_workers", "0", "--data.batch_size", "1"]
    _run([PY, "-m", "stage1_segment", "fit", *cfg1, "--data.data_root", str(tiny),
          "--data.work_dir", str(work), "--data.prepare_jobs", "2", *cpu,
          "--trainer.enable_checkpointing", "true"])
    _run([PY, "-m", "cspine", "crops", str(tiny), "--work", str(work), *cfg1, "--stage1-ckpt",
          "last", "--jobs", "2"])
    _run([PY, "-m", "stage2_classify", "fit", *cfg2, "--data.fold", "0", "--data.manifest",
          str(work / "stage1/crops/vertebrae.csv"), "--data.data_root", str(tiny),
          "--data.folds_csv", str(work / "folds.csv"), "--trainer.default_root_dir",
          str(work / "stage2/fold0"), "--oof_dir", str(work / "stage2/oof"), *cpu,
          "--data.batch_size", "2"])  # batch norm needs 2 samples in training
    return work, s1, Path(json.loads(s2.read_text())["checkpoint"])


def make_study(root: Path, dry: bool) -> Path:
    """The full-size synthetic test study (JPEG Lossless); ``dry``: a tiny one."""
    data = root / ("study_dry" if dry else "study_full")
    if not (data / "test_images").is_dir():
        args = (["--preset", "tiny", "--n-train", "0", "--n-test", "1"] if dry else
                ["--preset", "full", "--n-train", "0", "--n-test", "1", "--jpeg-fraction", "1"])
        _run([PY, "-m", "cspine", "synth", str(data), *args, "--no-progress"])
    return next((data / "test_images").iterdir())


def make_long_study(root: Path, study: Path) -> Path:
    """A 1,082-slice 512² JPEG-LL study (the longest RSNA study's slice count) for the peak-RSS
    check: the full study resampled to 1,082 thinner slices over the same field of view."""
    import numpy as np

    from common import geometry
    from common.dicom_io import load_series
    from common.synth.writer import write_series

    folder = root / "study_long" / "1.2.826.0.1.3680043.771082"
    done = folder.parent / ".complete"
    if done.exists():
        return folder
    src = load_series(study)
    shape = (*src.shape[:2], 1082)
    hu, affine = geometry.resample_to_shape(src.hu, src.affine, shape, order=1,
                                            cval=-1024.0, dtype=np.float32)
    sx, _, sz = geometry.spacing_of(affine)
    write_series(folder, folder.name, np.rint(hu).astype(np.int16), affine,
                 np.arange(1, 1083), float(sx), float(sz), jpeg=True)
    done.write_text("ok\n")
    return folder


def time_engine(study: Path, work: Path, device: str, repeats: int) -> tuple[list, dict]:
    """Cold + warm rounds of load → engine; returns (rows of step times, probabilities)."""
    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work

    t0 = time.perf_counter()
    engine = StudyEngine.from_spec(models_from_work(work), device=device)
    load_models = time.perf_counter() - t0
    rounds = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        volume = load_series(study)
        t = {"load": time.perf_counter() - t0}
        result = engine.run(volume)
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        t.update(result.timing_s)
        t["total"] = sum(t.values())
        rounds.append(t)
    return rounds, {"probabilities": result.probabilities, "shape": volume.shape,
                    "crops": len(result.found), "load_models": load_models}


def time_onnx(study: Path, work: Path, device: str, repeats: int) -> tuple[dict, dict]:
    """The engine with the networks exported to ONNX (``cspine export-bundle --format onnx``)
    and run by ONNX Runtime: warm medians and probabilities."""
    from common.dicom_io import load_series
    from cspine.bundle import export_bundle
    from cspine.engine import StudyEngine
    from cspine.models import models_from_bundle

    bundle = BENCH / ("bundle_onnx_dry" if "dry" in work.name else "bundle_onnx")
    if not (bundle / "bundle.json").is_file():
        export_bundle(work, bundle, fmt="onnx")
    engine = StudyEngine.from_spec(models_from_bundle(bundle), device=device)
    volume = load_series(study)
    rounds = [engine.run(volume) for _ in range(repeats + 1)]
    warm = {k: statistics.median(r.timing_s[k] for r in rounds[1:]) for k in rounds[0].timing_s}
    return warm, rounds[-1].probabilities


def time_plain(study: Path, work: Path, device: str) -> tuple[dict, dict]:
    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work
    from cspine.reference import plain_run

    engine = StudyEngine.from_spec(models_from_work(work), device=device)
    t0 = time.perf_counter()
    volume = load_series(study, workers=1)
    t = {"load": time.perf_counter() - t0}
    out = plain_run(engine, volume)
    t.update(out["timing_s"])
    t["total"] = sum(t.values())
    return t, out["probabilities"]


def time_command(study: Path, work: Path, out: Path, device: str) -> tuple[float, dict, float]:
    """``cspine predict`` as a user runs it: (wall s, its timing_s, peak RSS GiB of the command
    and its decode workers)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "cspine"), "predict", str(study), "--out", str(out),
           "--work", str(work), "--device", device]
    # a fresh wrapper process per command, so that its children's peak RSS is this command's
    # alone (RUSAGE_CHILDREN: the largest of the waited-for descendants)
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
               "print(time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n")
    res = _run([PY, "-c", wrapper, *cmd])
    wall, peak_kib, rc = res.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    doc = json.loads((out / "probabilities.json").read_text())
    return float(wall), doc["timing_s"], int(peak_kib) / 2**20


def time_batch(study: Path, work: Path, n: int, device: str, jobs: int) -> dict:
    """``cspine submit`` over ``n`` copies of the study: studies/min and GPU utilisation."""
    import pandas as pd

    from common.labels import TARGETS

    data = BENCH / f"batch_{n}"
    shutil.rmtree(data, ignore_errors=True)
    (data / "test_images").mkdir(parents=True)
    uids = [f"1.2.826.0.1.3680043.77{i:04d}" for i in range(n)]
    for uid in uids:
        os.symlink(study, data / "test_images" / uid)
    pd.DataFrame({"row_id": [f"{u}_{t}" for u in uids for t in TARGETS],
                  "fractured": 0.5}).to_csv(data / "sample_submission.csv", index=False)
    bwork = BENCH / f"batch_work_{n}"
    shutil.rmtree(bwork, ignore_errors=True)
    bwork.mkdir()
    for name in ("stage1", "stage2"):
        os.symlink(work / name, bwork / name)
    sampler = None
    if device.startswith("cuda") and shutil.which("nvidia-smi"):
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu",
                                    "--format=csv,noheader,nounits", "-lms", "200"],
                                   stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    _run([str(REPO / ".venv" / "bin" / "cspine"), "submit", str(data), "--work", str(bwork),
          "--device", device, "--jobs", str(jobs)])
    wall = time.perf_counter() - t0
    util = []
    if sampler is not None:
        sampler.terminate()
        util = [float(x) for x in sampler.communicate()[0].split() if x.strip()]
    return {"studies": n, "wall_s": wall, "per_min": 60 * n / wall,
            "gpu_util_mean": statistics.mean(util) if util else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="warm rounds (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rss", action="store_true", help="also `cspine predict` on 1,082 slices")
    p.add_argument("--batch", type=int, default=0, help="cspine submit over N study copies")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="decode processes")
    p.add_argument("--dry-run", action="store_true", help="tiny study and grids: code paths only")
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    BENCH.mkdir(parents=True, exist_ok=True)
    work, _, _ = make_models(BENCH, a.dry_run)
    study = make_study(BENCH, a.dry_run)
    rounds, info = time_engine(study, work, a.device, 1 if a.dry_run else a.repeats)
    plain, plain_probs = time_plain(study, work, a.device)
    warm = {k: statistics.median(r[k] for r in rounds[1:]) for k in rounds[0]}
    diff = max(abs(info["probabilities"][t] - plain_probs[t]) for t in plain_probs)
    onnx_t, onnx_probs = time_onnx(study, work, a.device, 1 if a.dry_run else a.repeats)
    onnx_diff = max(abs(onnx_probs[t] - plain_probs[t]) for t in plain_probs)
    wall, cmd_t, rss = time_command(study, work, BENCH / "predict_out", a.device)
    name = (torch.cuda.get_device_name(0) if a.device.startswith("cuda")
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    lines = [f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"study {info['shape']} ({study.name}), {info['crops']} crops"
             + ("; DRY RUN (tiny study, timings meaningless)" if a.dry_run else ""), "",
             "| step | engine cold s | engine warm s (median) | plain s | plain / engine warm |",
             "|---|---|---|---|---|"]
    for k in ("load", "stage1", "crops", "stage2", "total"):
        lines.append(f"| {k} | {rounds[0][k]:.2f} | {warm[k]:.2f} | {plain[k]:.2f} | "
                     f"{plain[k] / max(warm[k], 1e-9):.2f}× |")
    lines += ["", "ONNX Runtime (the same engine with `cspine export-bundle --format onnx` "
              "networks), warm medians: " + ", ".join(f"{k} {v:.2f} s" for k, v in onnx_t.items())
              + f"; probabilities vs plain: max |Δ| = {onnx_diff:.2e}"]
    lines += ["", f"probabilities, engine vs plain: max |Δ| = {diff:.2e} (must be < 1e-4)",
              f"load models: {info['load_models']:.2f} s",
              f"`cspine predict` command: {wall:.1f} s wall incl. start-up; inside: "
              + ", ".join(f"{k} {v:.2f}" for k, v in cmd_t.items()) + f"; peak RSS {rss:.2f} GiB"]
    if a.rss and not a.dry_run:
        long = make_long_study(BENCH, study)
        wall_l, t_l, rss_l = time_command(long, work, BENCH / "predict_long", a.device)
        lines.append(f"`cspine predict` on 1,082 slices: {wall_l:.1f} s wall, total "
                     f"{t_l['total']:.2f} s inside; peak RSS {rss_l:.2f} GiB")
    if a.batch:
        b = time_batch(study, work, a.batch, a.device, a.jobs)
        util = f"{b['gpu_util_mean']:.0f} %" if b["gpu_util_mean"] is not None else "n/a"
        lines.append(f"`cspine submit` over {b['studies']} studies: {b['wall_s']:.1f} s, "
                     f"{b['per_min']:.1f} studies/min (1,500 studies in "
                     f"{1500 / b['per_min']:.0f} min); GPU utilisation mean {util}")
    text = "\n".join(lines) + "\n"
    print(text)
    if max(diff, onnx_diff) >= 1e-4:
        raise SystemExit("engine, ONNX bundle and plain path disagree")
    if not a.dry_run:
        out = REPO / "benchmarks" / "results" / f"predict_full_{a.device.split(':')[0]}.md"
        out.write_text(f"# `python benchmarks/predict_full.py {' '.join(sys.argv[1:])}`, "
                       f"{time.strftime('%Y-%m-%d')}\n\n{text}")


if __name__ == "__main__":
    main()
