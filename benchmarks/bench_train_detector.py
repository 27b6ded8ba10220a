"""Detector training speed: crops/s and the fraction of the machine's 3D-convolution peak.

Measures, on this machine:

1. the 3D-convolution peak: a 32->32 channel 3x3x3 conv on a 64^3 volume in
   ``channels_last_3d`` (forward, GFLOP/s, best of several runs);
2. training throughput of the demo configuration (``config/config.yaml``
   ``detector``): crops/s of forward + backward + SGD step, in channels_last_3d
   (what training uses on the CPU) and in the contiguous format, and the
   achieved GFLOP/s (convolution FLOPs counted by a forward hook, x3 for the
   backward pass) as a fraction of the peak;
3. optionally (``--demo``) a whole ``train_detector`` run on demo-sized synthetic
   volumes (6 subjects of 180 x 216 x 112 voxels), wall time.

Writes ``benchmarks/results/train_detector.md``.
Run: ``.venv/bin/python benchmarks/bench_train_detector.py [--threads 2] [--demo]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from microbleed.data import DetectionCrops, Volume  # noqa: E402
from microbleed.losses import ConcentrationLoss, detection_loss  # noqa: E402
from microbleed.nets.detector import build_detector  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def conv_peak(device: torch.device = torch.device("cpu"), repeats: int = 5) -> float:
    """GFLOP/s of a 32->32, k3, 64^3 conv3d forward in channels_last_3d (best run)."""
    fmt = torch.channels_last_3d
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).to(device).to(memory_format=fmt)
    x = torch.randn(1, 32, 64, 64, 64, device=device).contiguous(memory_format=fmt)
    flops = 2 * 27 * 32 * 32 * 64 ** 3
    best = float("inf")
    with torch.no_grad():
        conv(x)
        _sync(device)
        for _ in range(repeats):
            t = time.perf_counter()
            conv(x)
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of every Conv3d / ConvTranspose3d for input ``x`` (2 per multiply-add)."""
    total = [0.0]

    def hook(mod, inp, out):
        k = int(np.prod(mod.kernel_size))
        if isinstance(mod, torch.nn.ConvTranspose3d):
            total[0] += 2.0 * k * mod.in_channels * mod.out_channels * inp[0][0, 0].numel() * inp[0].shape[0]
        else:
            total[0] += 2.0 * k * mod.in_channels * mod.out_channels * out[0, 0].numel() * out.shape[0]

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def throughput(dcfg: dict, fmt: torch.memory_format, steps: int = 6,
               device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(crops/s, training GFLOP/s) of forward + backward + SGD on demo crops."""
    from test_detector_synth import AFFINE, synth_volume
    torch.manual_seed(0)
    crop = tuple(dcfg["crop"])
    shape = tuple(2 * c for c in crop)
    spheres = [tuple(int(s) for s in np.array(shape) * f) for f in (0.3, 0.5, 0.7)]
    vol = Volume("b", synth_volume(shape, spheres), AFFINE, np.array(spheres, float))
    ds = DetectionCrops([vol], crop, 64, seed=0)
    bs = int(dcfg["batch_size"])
    net = build_detector({"variant": dcfg["variant"], "widths": dcfg["widths"]}).to(device).to(memory_format=fmt)
    hspl = ConcentrationLoss(net.feature_channels).to(device)
    opt = torch.optim.SGD(list(net.parameters()) + list(hspl.parameters()), lr=0.01, momentum=0.9)
    batches = [{k: torch.stack([ds[i + j][k] for j in range(bs)]).to(device) for k in ds[0]}
               for i in range(0, bs * (steps + 1), bs)]
    times = []
    for b in batches:
        t = time.perf_counter()
        out = net(b["image"].contiguous(memory_format=fmt))
        loss = detection_loss(out, b, dcfg["loss_weights"], dcfg["focal"], hspl)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    per_batch = float(np.median(times[1:]))
    flops = 3 * conv_flops(net.eval(), batches[0]["image"].contiguous(memory_format=fmt))
    return bs / per_batch, flops / per_batch / 1e9


def demo_run(cfg: dict) -> tuple[float, dict]:
    """Wall time (s) of train_detector on 6 demo-sized synthetic subjects + its card."""
    from microbleed.train import train_detector
    from test_detector_synth import make_subject
    rng = np.random.default_rng(0)
    shape = (180, 216, 112)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for i in range(6):
            spheres = [tuple(int(v) for v in rng.uniform(20, np.array(shape) - 20)) for _ in range(4 if i < 5 else 0)]
            tubes = [(2, tuple(int(v) for v in rng.uniform(20, 160, 2))) for _ in range(3)]
            inputs.append(make_subject(Path(tmp), f"{i:02d}", spheres, tubes, shape=shape, seed=i))
        t = time.perf_counter()
        card = train_detector(inputs, Path(tmp) / "m", cfg, "cpu", cohort="synthetic-demo-size")
        return time.perf_counter() - t, card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo", action="store_true", help="also time a whole demo-config training run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_detector.md"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--paper", action="store_true",
                    help="paper-sized training: 128^3 crops, widths 16..256, batch 1 (instead of the demo config)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    d = cfg["detector"]
    if args.paper:
        d = {**d, "crop": [128, 128, 128], "widths": [16, 32, 64, 128, 256], "batch_size": 1}
    peak = conv_peak(device)
    rows = []
    for name, fmt in (("channels_last_3d", torch.channels_last_3d), ("contiguous", torch.contiguous_format)):
        cps, gflops = throughput(d, fmt, device=device)
        rows.append(f"| {name} | {cps:.2f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |")
    lines = [
        "# Detector training throughput", "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}",
        f"- command: `.venv/bin/python benchmarks/bench_train_detector.py --threads {args.threads} --device {args.device}"
        f"{' --paper' if args.paper else ''}{' --demo' if args.demo else ''}`",
        f"- config: {'paper-sized' if args.paper else 'demo'} `detector`: variant {d['variant']}, crop {d['crop']}, widths {d['widths']}, "
        f"batch {d['batch_size']}",
        f"- 3D-convolution peak (32->32, k3, 64^3, channels_last_3d, forward): {peak:.1f} GFLOP/s", "",
        "| memory format | crops/s (fwd+bwd+step) | conv GFLOP/s (fwd x3) | of peak |",
        "|---|---|---|---|", *rows,
    ]
    if args.demo:
        seconds, card = demo_run(cfg)
        lines += ["", f"Whole demo-config run (`train_detector`, {d['epochs']} epochs x {d['crops_per_epoch']} crops, "
                  "validation every epoch) on 6 synthetic subjects of 180x216x112 voxels: "
                  f"**{seconds:.0f} s**; best epoch {card['selection']['best_epoch']}, validation FROC score "
                  f"{card['validation'].get('mean_sensitivity', float('nan')):.3f}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
