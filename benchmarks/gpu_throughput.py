"""GPU throughput of both stages' default (GPU) networks, and one study end to end.

Run on a CUDA machine (see benchmarks/gpu_check.sh). Builds the networks exactly as
``configs/stage1/base.yaml`` and ``configs/stage2/base.yaml`` declare them (class_path/init_args),
times training steps under fp16 autocast (the configs' ``16-mixed``) with the loss in fp32, and
inference; then times one full-size synthetic study through load → stage 1 → crops → stage 2
with the checkpoints given on the command line. Prints a markdown table.

Usage: python benchmarks/gpu_throughput.py --stage1-ckpt S1.ckpt --stage2-ckpt S2.ckpt --study DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from stage2_classify.inference import instantiate_net

#: Device of the run: "cuda" (the purpose of this script) or "cpu" (``--device cpu``: a dry run
#: that checks the code paths on a machine without a GPU; its timings mean nothing).
DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _autocast() -> torch.autocast:
    """fp16 autocast on CUDA (the configs' ``16-mixed``); disabled on the CPU dry run."""
    return torch.autocast(DEV, dtype=torch.float16, enabled=DEV == "cuda")


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")


def _timed(fn, steps: int, warmup: int = 3) -> float:
    if DEV == "cpu":
        steps, warmup = 1, 0
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / steps


def _time_train_and_infer(params, x: torch.Tensor, loss_of, infer_batch: int, lr: float
                          ) -> tuple[float, float, float]:
    """(train step s, inference s, peak GiB) of ``loss_of(x)`` under fp16 autocast with the loss
    in fp32 (as the LightningModules do) and AdamW + GradScaler; inference on ``x[:infer_batch]``.
    ``loss_of(x, train)`` returns the fp32 loss when ``train`` and runs the forward only otherwise."""
    opt = torch.optim.AdamW(params, lr)
    scaler = torch.amp.GradScaler(DEV, enabled=DEV == "cuda")

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = _timed(train_step, 10)
    mem = _peak_gib()

    @torch.no_grad()
    def infer():
        loss_of(x[:infer_batch], False)

    return t_train, _timed(infer, 10), mem


def stage1_rows(batch: int = 2) -> list[tuple[str, str]]:
    from monai.losses import DiceCELoss

    cfg = yaml.safe_load(Path("configs/stage1/base.yaml").read_text())
    spec = cfg["model"]["net"]
    spec["init_args"]["out_channels"] = 8
    net = instantiate_net(spec).to(DEV)
    shape = cfg["data"]["grid_shape"]
    x = torch.randn(batch, 1, *shape, device=DEV)
    y = torch.randint(0, 8, (batch, 1, *shape), device=DEV)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_of(xb: torch.Tensor, train: bool) -> torch.Tensor | None:
        net.train(train)
        with _autocast():
            logits = net(xb)
        return loss_fn(logits.float(), y) if train else None  # loss in fp32, as Stage1Module

    t_train, t_inf, mem = _time_train_and_infer(net.parameters(), x, loss_of, 1, 1e-3)
    return [("stage 1 UNet train step", f"{batch}×{shape} fp16-mixed: {t_train*1000:.0f} ms "
             f"({batch / t_train:.1f} volumes/s), peak {mem:.1f} GiB"),
            ("stage 1 UNet inference", f"1×{shape}: {t_inf*1000:.0f} ms per volume")]


def stage2_rows(batch: int = 16) -> list[tuple[str, str]]:
    cfg = yaml.safe_load(Path("configs/stage2/base.yaml").read_text())
    s1 = yaml.safe_load(Path("configs/stage1/base.yaml").read_text())
    crop = s1["crops"]["shape"]
    spec = cfg["model"]["net"]
    from stage2_classify.data import num_channels

    d = cfg["data"]
    channels = num_channels(d["windows"], d.get("all_mask", False),
                            d.get("vertebra_channels", False), d.get("masked_image"),
                            d.get("lucency"), d.get("lucency_fill", False), d.get("gap"))
    spec["init_args"]["in_channels"] = channels
    net = instantiate_net(spec).to(DEV)
    x = torch.randn(batch, channels, *crop, device=DEV)
    y = torch.randint(0, 2, (batch,), device=DEV).float()
    head = torch.nn.LazyLinear(1).to(DEV)
    with torch.no_grad(), _autocast():
        head(net(x[:2]).float())

    def loss_of(xb: torch.Tensor, train: bool) -> torch.Tensor | None:
        net.train(train)
        with _autocast():
            f = net(xb)
        if not train:
            return None
        return torch.nn.functional.binary_cross_entropy_with_logits(head(f.float())[:, 0], y)

    params = list(net.parameters()) + list(head.parameters())
    t_train, t_inf, mem = _time_train_and_infer(params, x, loss_of, 7, 3e-4)
    return [("stage 2 net train step", f"{spec['class_path'].rsplit('.', 1)[1]} {batch}×{channels}ch×{crop} "
             f"fp16-mixed: {t_train*1000:.0f} ms ({batch / t_train:.0f} crops/s), peak {mem:.1f} GiB"),
            ("stage 2 net inference", f"7 crops (one study): {t_inf*1000:.0f} ms")]


def end_to_end_rows(study: str, s1_ckpt: str, s2_ckpt: str) -> list[tuple[str, str]]:
    """One study through the test-time engine (:class:`cspine.engine.StudyEngine`), cold and
    warm, with the engine's own step timings."""
    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from stage1_segment.crops import crop_config
    from stage1_segment.inference import load_model
    from stage2_classify.inference import load_models

    s1 = yaml.safe_load(Path("configs/stage1/base.yaml").read_text())
    engine = StudyEngine(load_model(s1_ckpt, DEV), crop_config(s1["crops"]),
                         load_models([s2_ckpt], DEV))
    rows = []
    for attempt in ("cold", "warm"):
        t0 = time.perf_counter()
        vol = load_series(study, lenient=True)
        t = {"load": time.perf_counter() - t0}
        result = engine.run(vol)
        _sync()
        t.update(result.timing_s)
        total = sum(t.values())
        rows.append((f"one study end to end ({attempt})",
                     f"{vol.shape} voxels: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
                     + f"; total {total:.2f} s"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage1-ckpt")
    p.add_argument("--stage2-ckpt")
    p.add_argument("--study")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of the code paths (batch 1, timings meaningless)")
    a = p.parse_args()
    global DEV
    DEV = a.device
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU dry run"
    rows = [("device", f"{name}, torch {torch.__version__}")]
    batch = 1 if DEV == "cpu" else None
    rows += stage1_rows(batch or 2)
    rows += stage2_rows(batch or 16)
    if a.study:
        rows += end_to_end_rows(a.study, a.stage1_ckpt, a.stage2_ckpt)
    print("| what | measured |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
