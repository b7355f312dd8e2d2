"""Training throughput of diffusion priors: optimizer steps per second for the demo-sized slice prior.

Each row times one full training step exactly as :func:`medrecon.diffusion.train.train` runs it (the
epsilon loss on a random batch of toy disc images, backward, gradient clipping, AdamW, EMA update), median
of ``--steps`` steps after ``--warmup`` warm-up steps, ``--threads`` torch threads. Rows: the demo slice
spec at 64x64 (attention at 16x16 only), the same net with attention also at 32x32 (what the CPU cap
allows, to show its cost), a 128x128 variant with one more level, and the EDM loss on the demo spec. With
a GPU (or ``--device cuda``) the rows run on CUDA with bf16 autocast as training does.

Run: ``python benchmarks/train_throughput.py`` -> prints a table, writes
``benchmarks/out/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medrecon.diffusion.datasets import toy_discs
from medrecon.diffusion.networks import build_unet, count_parameters, network_spec_defaults
from medrecon.diffusion.schedules import EDMSchedule, VPSchedule
from medrecon.diffusion.train import diffusion_loss, resolve_train_config

HERE = Path(__file__).resolve().parent


def rows() -> list[tuple[str, dict, str]]:
    """(name, spec, loss) of each benchmark row."""
    demo = network_spec_defaults("slice")
    return [
        ("slice 64 demo (attn 16)", demo, "epsilon"),
        ("slice 64 attn 32+16", {**demo, "attention_max_resolution": 32}, "epsilon"),
        ("slice 128 (attn 16)", {**demo, "image_size": 128, "channels": [32, 64, 64, 64]}, "epsilon"),
        ("slice 64 demo, EDM loss", demo, "edm"),
    ]


def time_row(spec: dict, loss: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per training step of one configuration."""
    torch.manual_seed(0)
    net = build_unet(spec).to(device).train()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    cfg = resolve_train_config({"loss": loss})
    sched = VPSchedule() if loss == "epsilon" else EDMSchedule()
    ab = sched.alphas_cumprod if loss == "epsilon" else None
    size = int(spec["image_size"])
    x = torch.from_numpy(toy_discs(batch, size, seed=0)).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(i)
        with amp:
            value = diffusion_loss(net, {"x": x}, cfg, sched, gen, ab)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update_parameters(net)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"seconds_per_step": med, "steps_per_s": 1.0 / med, "images_per_s": batch / med,
            "p90_seconds": float(np.percentile(times, 90)), "parameters": count_parameters(net),
            "image_size": size, "batch": batch, "loss": loss, "attention_levels": net.spec["attention_levels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    results = {}
    print(f"{'row':28s} {'params':>9s} {'s/step':>8s} {'steps/s':>8s} {'img/s':>8s}  ({dev}, batch {args.batch}, "
          f"{args.threads} threads)")
    for name, spec, loss in rows():
        r = time_row(spec, loss, args.batch, args.steps, args.warmup, dev)
        results[name] = r
        print(f"{name:28s} {r['parameters'] / 1e6:8.2f}M {r['seconds_per_step']:8.3f} {r['steps_per_s']:8.2f} "
              f"{r['images_per_s']:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(dev), "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "steps": args.steps}
    if dev.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
