"""Anatomical segmenter: speed and memory per subject, and Dice per class on the test cohorts.

Speed mode (default) times :func:`microbleed.segment.segment_volume` on one
subject at demo resolution (180x216x90 voxels, 1x1x2 mm) and at paper
resolution (512x448x72 voxels, 0.5x0.5x2 mm), with the network and sliding
window of the config's ``segmenter`` section, plus one training step (a batch
of ``batch_size`` crops). Weights: the trained model of ``--model`` when given,
else random (speed does not depend on the weights). Targets: paper resolution
under 90 s on a 2-core CPU and under 10 s on a GPU.

    .venv/bin/python benchmarks/bench_segmenter.py --device cpu   # -> benchmarks/results/segmenter.md

Dice mode scores the trained segmenters (``results/models/segmenter_<swi|t1>``,
trained by the workflow) on every ``evaluate_cohorts`` cohort of the config,
against the aseg-derived BOMBS maps (``results/<cohort>/labels/``, else the
simulated truth), pooled over each cohort's subjects:

    .venv/bin/python benchmarks/bench_segmenter.py --dice --config config/benchmark.yaml
    # -> benchmarks/results/segmenter_dice.md (+ .tsv)
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from microbleed.cohort import cohort_table, simulated_root
from microbleed.io import load_volume, preproc_path
from microbleed.metrics import dice_per_class
from microbleed.nets.segmenter import build_segmenter
from microbleed.segment import load_segmenter, make_loss, segment_volume
from microbleed.runtime import PeakMemory, read_card, select_device

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"demo (1x1x2 mm)": (180, 216, 90), "paper (0.5x0.5x2 mm)": (512, 448, 72)}
TARGET_S = {"cpu": 90.0, "cuda": 10.0}


def phantom_image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth [0, 1] head-like volume ``(X, Y, Z)`` (content does not change the speed)."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    noise = np.random.default_rng(seed).normal(0, 0.05, shape).astype(np.float32)
    return np.clip(np.where(r < 0.85, 0.6 + 0.2 * g[2], 0.0) + noise, 0, 1).astype(np.float32)


def time_segmentation(model, shape, device, seg_cfg, repeats: int) -> dict[str, float]:
    """Median seconds and peak memory (MB, above the baseline for the CPU) of one whole-volume pass."""
    image = phantom_image(shape)
    args = (tuple(seg_cfg["window"]), float(seg_cfg["overlap"]), int(seg_cfg["sw_batch_size"]))
    segment_volume(model, image[:64, :64, :16], device, *args)   # warm-up (oneDNN / cuDNN plans)
    times, peak, base = [], 0.0, PeakMemory.rss_mb()
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            segment_volume(model, image, device, *args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak if device.type == "cuda" else mem.peak - base)
    return {"seconds": statistics.median(times), "peak_mb": peak}


def time_train_step(cfg: dict, device: torch.device, steps: int = 3) -> float:
    """Median seconds of one optimiser step on a batch of ``batch_size`` training crops."""
    model = build_segmenter(cfg).to(device).train()
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), make_loss(cfg.get("loss", "dice"))
    x = torch.rand(int(cfg["batch_size"]), 4, *cfg["crop"], device=device).contiguous(
        memory_format=torch.channels_last_3d)
    y = torch.randint(0, 4, (int(cfg["batch_size"]), 1, *cfg["crop"]), device=device)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def machine(device: torch.device) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""
    return (f"{platform.node()}: {cpu}, {torch.get_num_threads()} torch threads{gpu}; "
            f"torch {torch.__version__}, {dt.datetime.now().isoformat(timespec='minutes')}")


def speed(cfg: dict, device: torch.device, model_dir: str | None, repeats: int, out: Path) -> None:
    seg_cfg = cfg["segmenter"]
    model = load_segmenter(model_dir, device) if model_dir else build_segmenter(seg_cfg).to(device).eval()
    rows = []
    for name, shape in SHAPES.items():
        r = time_segmentation(model, shape, device, seg_cfg, repeats)
        rows.append(f"| {name} | {'x'.join(map(str, shape))} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |")
        print(rows[-1], flush=True)
    step = time_train_step(dict(seg_cfg), device)
    lines = [f"# Segmenter speed ({device.type})", "", f"Machine: {machine(device)}.", "",
             f"Network widths {seg_cfg['widths']}, window {seg_cfg['window']}, overlap {seg_cfg['overlap']}, "
             f"sw_batch_size {seg_cfg['sw_batch_size']}, weights: {model_dir or 'random'}; median of {repeats}.",
             f"Target at paper resolution: < {TARGET_S[device.type]:.0f} s per subject.", "",
             "| resolution | voxels | seconds per subject | peak memory MB |", "|---|---|---|---|", *rows, "",
             f"Training step (batch {seg_cfg['batch_size']} crops of {seg_cfg['crop']}): {step:.2f} s; "
             f"an epoch of {seg_cfg['crops_per_epoch']} crops: about "
             f"{step * -(-int(seg_cfg['crops_per_epoch']) // int(seg_cfg['batch_size'])):.1f} s.",
             "", "Command: `.venv/bin/python " + " ".join(["benchmarks/bench_segmenter.py", *sys.argv[1:]]) + "`",
             ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def _truth_path(cohort: str, entry: dict, subject: str) -> Path:
    labels = ROOT / "results" / cohort / "labels" / f"sub-{subject}_desc-bombs_dseg.nii.gz"
    if labels.exists() or "simulate" not in entry:
        return labels
    return (simulated_root(cohort, ROOT / "results") / "derivatives" / "truth" / f"sub-{subject}"
            / f"sub-{subject}_desc-bombs_dseg.nii.gz")


def dice(cfg: dict, device: torch.device, out: Path) -> None:
    """Dice per class of each trained segmenter on each evaluated cohort (pooled over subjects)."""
    seg_cfg, rows = cfg["segmenter"], []
    for segin, suffix in (("swi", "swi"), ("t1", "T1w")):
        model_dir = ROOT / "results" / "models" / f"segmenter_{segin}"
        if not (model_dir / "model.pt").exists():
            print(f"skip {segin}: {model_dir}/model.pt not found (run the workflow's train_segmenter first)")
            continue
        model, offsets = load_segmenter(model_dir, device), read_card(model_dir).get("class_offsets")
        for cohort in cfg["evaluate_cohorts"]:
            entry = cfg["cohorts"][cohort]
            preds, truths, t0 = [], [], time.perf_counter()
            for sid in cohort_table(cohort, entry, ROOT / "results")["subject"]:
                img = preproc_path(ROOT / "results", cohort, sid, f"preproc_{suffix}")
                if not img.exists():
                    continue
                image, _ = load_volume(img, sid)
                preds.append(segment_volume(model, image, device, tuple(seg_cfg["window"]),
                                            float(seg_cfg["overlap"]), int(seg_cfg["sw_batch_size"]),
                                            offsets=offsets).ravel())
                truths.append(load_volume(_truth_path(cohort, entry, sid), sid, dtype=np.int16)[0].ravel())
            if preds:
                d = dice_per_class(np.concatenate(preds), np.concatenate(truths))
                rows.append({"input": segin, "cohort": cohort, "subjects": len(preds), **d,
                             "seconds_per_subject": (time.perf_counter() - t0) / len(preds)})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".tsv"), sep="\t", index=False, float_format="%.4f")
    body = table.to_markdown(index=False, floatfmt=".3f") if len(table) else "(no trained segmenter found)"
    out.write_text(f"# Segmenter Dice per class\n\nMachine: {machine(device)}.\n\n{body}\n\n"
                   "Paper (SWI, internal test): lobar 0.904, deep 0.854, infratentorial 0.925.\n")
    print(f"wrote {out}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: Path) -> dict:
    """config/config.yaml overlaid with ``path`` (as Snakemake's ``--configfile`` does), schema defaults filled."""
    from snakemake.utils import validate
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    if path.resolve() != (ROOT / "config" / "config.yaml").resolve():
        cfg = _merge(cfg, yaml.safe_load(path.read_text()))
    validate(cfg, str(ROOT / "config" / "schemas" / "config.schema.yaml"), set_default=True)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--model", default=None, help="trained model folder (speed mode; default random weights)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dice", action="store_true", help="Dice per class on the evaluated cohorts")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/segmenter[_dice].md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(args.config))
    device = select_device(args.device)
    results = ROOT / "benchmarks" / "results"
    if args.dice:
        dice(cfg, device, Path(args.out) if args.out else results / "segmenter_dice.md")
    else:
        name = "segmenter.md" if device.type == "cpu" else f"segmenter_{device.type}.md"
        speed(cfg, device, args.model, args.repeats, Path(args.out) if args.out else results / name)


if __name__ == "__main__":
    main()
