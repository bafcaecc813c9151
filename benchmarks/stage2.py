"""Stage-2 speed on this machine: training and inference throughput of candidate backbones.

Random crops of the configured shape (no data needed); prints a Markdown table. Training covers
forward + backward + AdamW step at batch 32; inference is one forward pass at batch 7 (one study).

    python benchmarks/stage2.py --shape 48 48 32 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch


def candidates(in_ch: int) -> dict[str, torch.nn.Module]:
    from monai.networks.nets import DenseNet121

    from stage2_classify.nets import ResNet3d, SmallCNN3d

    return {
        "SmallCNN3d [16,32,64] stride 1": SmallCNN3d(in_ch, 64, (16, 32, 64)),
        "SmallCNN3d [16,32,64] stem stride 2": SmallCNN3d(in_ch, 64, (16, 32, 64), stem_stride=2),
        "SmallCNN3d [8,16,32] stem stride 2": SmallCNN3d(in_ch, 64, (8, 16, 32), stem_stride=2),
        "ResNet3d-10 [16,32,64,128]": ResNet3d(in_ch, 64, 10, (16, 32, 64, 128)),
        "DenseNet121 (MONAI)": DenseNet121(spatial_dims=3, in_channels=in_ch, out_channels=64),
    }


def bench(net: torch.nn.Module, shape: tuple[int, ...], in_ch: int, steps: int) -> tuple[float, float]:
    """(train crops/s, inference ms per study of 7 crops)."""
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(32, in_ch, *shape)
    net.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    train = 32 * steps / (time.perf_counter() - t0)
    net.eval()
    with torch.no_grad():
        xs = torch.randn(7, in_ch, *shape)
        net(xs)
        t0 = time.perf_counter()
        for _ in range(steps):
            net(xs)
    return train, 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 48, 20])
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="substring filter on the net names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = {}
    print(f"| net | params | train crops/s | inference ms/study (7 crops) |  shape {args.shape}, "
          f"{args.threads} threads")
    print("|---|---|---|---|")
    for name, net in candidates(args.channels).items():
        if args.only and args.only not in name:
            continue
        params[name] = sum(p.numel() for p in net.parameters())
        tr, inf = bench(net, tuple(args.shape), args.channels, args.steps)
        print(f"| {name} | {params[name] / 1e6:.2f} M | {tr:.1f} | {inf:.0f} |", flush=True)


if __name__ == "__main__":
    main()
