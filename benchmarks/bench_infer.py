"""Per-subject inference speed: our engine against MONAI sliding_window_inference at its defaults.

Subjects: ``demo`` and ``paper`` are synthetic smooth noise filling the whole
grid (SWI 160x192x72 at 1x1x2 mm, detector grid z=112; SWI 512x448x72 at
0.5x0.5x2 mm, detector grid z=224): no brain mask, so every tile runs (the
worst case). ``paper-head`` is one head simulated by the project's simulator
at the paper acquisition (config ``acquisitions.paper``, 0.5x0.5x2 mm),
pre-processed as the workflow does (truth brain mask instead of skull
stripping, normalisation, phase high-pass, RAS reordering, resampling to the
detector's grid from its card: z 224 slices on the paper's grid, or its mm spacing); our engine skips the tiles far from the brain mask
(``infer.skip_outside_mask``) and both engines' FINAL detections (score >=
threshold, after pruning with the same mask and their own BOMBS map) are
compared. Measured per subject: detection (ours: :func:`microbleed.infer.detect_volume`; baseline:
:func:`microbleed.infer.detect_volume_monai`), NMS + mapping, segmentation
(:func:`microbleed.segment.segment_volume` vs MONAI defaults on the same
segmenter) and pruning. Reports seconds, peak memory, the detector's achieved
GFLOP/s as a fraction of this machine's measured 3D-conv peak (32->32 channels,
64^3, channels_last_3d), and the number of detections of both (>= floor and
>= threshold after NMS) with how many match within 2 voxels.

Trained models in ``--models`` (default ``results/models/``) are used when present; otherwise
randomly initialised networks with the demo widths (config/config.yaml) and
the paper-scale widths (``--paper-widths``) are used, and the class-logit bias
of the random detector is set to 0 so that it produces candidates at all (the
prior-probability initialisation gives 0.01 everywhere). The output says which.

Run: ``.venv/bin/python benchmarks/bench_infer.py --device cpu``
(writes benchmarks/results/infer.md).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage
from scipy.spatial import cKDTree
from torch.utils.flop_counter import FlopCounterMode

from microbleed.infer import (_window_for, candidates_table, detect_volume, detect_volume_monai, plan_tiles,
                              dark_voxels, prune, tiles_to_run)
from microbleed.nets.detector import build_detector
from microbleed.preprocess import card_grid, card_normalisation, grid_spec, normalisation_spec
from microbleed.nets.segmenter import build_segmenter, coordinate_channels, coordinate_frame
from microbleed.runtime import PeakMemory, provenance, seed_everything, select_device

ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS = {   # name: (SWI shape, voxel mm, detector z slices)
    "demo": ((160, 192, 72), (1.0, 1.0, 2.0), 112),
    "paper": ((512, 448, 72), (0.5, 0.5, 2.0), 224),
}


def conv_peak_gflops(device: torch.device, repeats: int = 5) -> float:
    """Measured GFLOP/s of a 32->32 channel 3x3x3 conv3d on 64^3 in channels_last_3d."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last_3d)
    x = torch.rand(1, 32, 64, 64, 64, device=device).contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * 27 * 32 * 32 * 64 ** 3
    with torch.inference_mode():
        conv(x)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            conv(x)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(model: torch.nn.Module, shape) -> float:
    """FLOPs of one forward pass on an input of ``shape`` (counted on the meta device)."""
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        meta(torch.zeros(shape, device="meta"))
    return float(counter.get_total_flops())


def make_subject(res: str, seed: int = 0):
    """Synthetic SWI-grid image, detector input (2, X, Y, Zi) and both affines."""
    shape, vox, z = RESOLUTIONS[res]
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(tuple(s // 4 for s in shape)), 1.0)
    img = ndimage.zoom(img, 4, order=1).astype(np.float32)
    img = (img - img.min()) / (img.max() - img.min())
    swi_aff = np.diag([*vox, 1.0])
    zi = ndimage.zoom(img, (1, 1, z / shape[2]), order=1).astype(np.float32)
    grid_aff = swi_aff @ np.diag([1.0, 1.0, shape[2] / z, 1.0])
    return img, np.stack([zi, 1.0 - zi]), swi_aff, grid_aff


def make_head(cache: Path, cfg: dict, grid: dict, seed: int = 2026, normalisation: dict | None = None) -> dict:
    """One head simulated at the paper acquisition and pre-processed as the workflow does,
    its detector input on ``grid`` (the detector's card, :func:`microbleed.preprocess.card_grid`).

    Cached in ``cache`` (simulation ~40 s on 2 cores). The truth brain mask stands in
    for skull stripping. ``normalisation``: the detector card's (:func:`card_normalisation`),
    default the config's. Returns the arrays both engines need (RAS-reordered SWI grid).
    """
    import pandas as pd
    from microbleed.io import load_volume, to_canonical
    from microbleed.preprocess import detector_input, preprocess_swi_phase
    from microbleed.simulate import simulate_subject, subject_paths
    sub = "paper01"
    paths = subject_paths(cache, sub)
    if not Path(paths["brain_mask"]).exists():
        simulate_subject(cache, sub, "cmb", seed, cfg["acquisitions"]["paper"], threads=2)
    tag = "x".join(f"{v:g}" for v in grid["spacing_mm"]) + "mm" if "spacing_mm" in grid else f"z{grid['z_slices']}"
    p = cfg["preprocess"]
    # the detector's own (its card), else the config's; in the file names: a cache of another is not reused
    norm = normalisation or normalisation_spec(p)
    ntag = "p{:g}-{:g}e{:g}".format(*norm["percentiles"], norm["anchor_erode_mm"])
    pre = {k: cache / f"sub-{sub}_norm-{ntag}_desc-{k}.nii.gz" for k in ("preproc_swi", "preproc_phase")}
    pre["detector_input"] = cache / f"sub-{sub}_norm-{ntag}_grid-{tag}_desc-detector_input.nii.gz"
    if not pre["preproc_swi"].exists():
        preprocess_swi_phase(paths["swi"], paths["phase"], paths["brain_mask"], pre["preproc_swi"],
                             pre["preproc_phase"], subject=sub, phase_mode=p["phase"], phase_units=p["phase_units"],
                             phase_sign=p["phase_sign"] if p["phase_sign"] == "auto" else int(p["phase_sign"]),
                             highpass_fwhm_mm=float(p["highpass_fwhm_mm"]),
                             percentiles=tuple(norm["percentiles"]), anchor_erode_mm=norm["anchor_erode_mm"])
    if not pre["detector_input"].exists():
        detector_input(pre["preproc_swi"], pre["preproc_phase"], pre["detector_input"], grid, sub)
    swi, aff = load_volume(pre["preproc_swi"], sub)
    img, swi_aff = to_canonical(swi, aff)
    truth = pd.read_csv(paths["cmb"], sep="\t")[["x", "y", "z"]].to_numpy(float)
    return {"image": np.ascontiguousarray(img, dtype=np.float32), "swi_affine": swi_aff,
            "detector_input": pre["detector_input"], "mask_path": Path(paths["brain_mask"]),
            "mask": load_volume(paths["brain_mask"], sub, allow_zero=True), "truth": truth, "swi_shape": swi.shape,
            "grid": grid}


def networks(widths_det, widths_seg, device, models: Path):
    """Trained networks when ``models`` has them, else random ones (bias set to 0).

    Returns ``(detector, segmenter, origin, card)``; ``card`` is the detector's card
    (``{}`` for random networks; its ``config.crop`` caps our tiles, as in the workflow).
    """
    det_dir = models / "detector_rpn-ffm-hspl"
    seg_dir = models / "segmenter_swi"
    if (det_dir / "model.pt").exists() and (seg_dir / "model.pt").exists():
        from microbleed.segment import load_segmenter
        from microbleed.train import load_detector
        from microbleed.runtime import read_card
        det, card = load_detector(det_dir, device)
        card = {**card, "segmenter_card": read_card(seg_dir)}
        return det, load_segmenter(seg_dir, device), f"trained ({models})", card
    seed_everything(0)
    det = build_detector({"variant": "rpn+ffm+hspl", "widths": widths_det, "in_channels": 2})
    last = [m for m in det.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    torch.nn.init.normal_(last.weight, std=0.5)
    torch.nn.init.zeros_(last.bias)
    seg = build_segmenter({"widths": widths_seg, "in_channels": 4, "n_classes": 4})
    return det.to(device).eval(), seg.to(device).eval(), "random (class bias 0, head std 0.5)", {}


def segment_monai(model, image, device, roi):
    from monai.inferers import sliding_window_inference
    frame = coordinate_frame(image, getattr(model, "coordinates", "volume"))
    x = torch.from_numpy(np.concatenate([image[None], coordinate_channels(image.shape, frame=frame)]))[None].to(device)
    with torch.no_grad():
        return sliding_window_inference(x, tuple(min(r, s) for r, s in zip(roi, image.shape)), 1,
                                        model).argmax(1)[0].to(torch.uint8).cpu().numpy()


def run_pipeline(kind, det, seg, subject, device, cfg, threshold, window):
    """One subject: detection, NMS + mapping, segmentation, pruning. Returns timings and counts.

    On CUDA the pipeline runs twice and the second run is reported (the first
    pays for cuDNN algorithm selection and allocator warm-up).
    """
    if device.type == "cuda":
        _run_once(kind, det, seg, subject, device, cfg, threshold, window)
    return _run_once(kind, det, seg, subject, device, cfg, threshold, window)


def engine_check(device) -> str:
    """Equal detections, checked with an analytic detector that finds dark blobs exactly.

    Random networks cannot show that both engines find the same CMBs (their
    peaks depend on tile context); the analytic fake of the tests can: 24
    blobs planted at random in a demo-size grid, 64^3 windows for both engines.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from test_infer_fakes import DarkCentroidNet, blob_image
    rng = np.random.default_rng(1)
    shape = (160, 192, 112)
    truth = rng.uniform(12, np.asarray(shape) - 12, size=(24, 3))
    img = blob_image(shape, np.eye(4), truth)
    vol = np.stack([img, 1.0 - img])
    found = {}
    for name, fn in [("ours", lambda: detect_volume(DarkCentroidNet(), vol, device, (64, 64, 64), 0.25)),
                     ("MONAI", lambda: detect_volume_monai(DarkCentroidNet(), vol, device, (64, 64, 64)))]:
        c = fn()
        c = c[c[:, 3] >= 0.5]
        d, _ = cKDTree(c[:, :3]).query(truth)
        found[name] = f"{name} {len(c)} detections, {int((d < 1.0).sum())}/24 within 1 voxel (max error {d.max():.2f} voxels)"
    return "- engine check (analytic blob detector, 24 planted blobs): " + "; ".join(found.values())


def _run_once(kind, det, seg, subject, device, cfg, threshold, window):
    """``subject``: dict with ``image, volume, swi_affine, grid_affine`` and optionally
    ``mask_path`` (SWI-grid brain mask file: ours maps it onto the detector grid and
    skips tiles, timed) and ``mask`` (``(data, affine)``, used by the pruning of both)."""
    from microbleed.preprocess import detector_grid_mask
    from microbleed.segment import segment_image
    img, vol, swi_aff, grid_aff = (subject[k] for k in ("image", "volume", "swi_affine", "grid_affine"))
    out = {}
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        if kind == "ours":
            grid_mask = (detector_grid_mask(subject["mask_path"], subject.get("grid", vol.shape[3]))[0]
                         if subject.get("mask_path") and cfg["infer"].get("skip_outside_mask", True) else None)
            cands = detect_volume(det, vol, device, window, cfg["infer"]["overlap"],
                                  cfg["infer"]["candidate_floor"], cfg["infer"]["batch_size"], mask=grid_mask)
            out["tiles_run"] = len(tiles_to_run(plan_tiles(vol.shape[1:], window, cfg["infer"]["overlap"]),
                                                grid_mask))
        else:
            cands = detect_volume_monai(det, vol, device, cfg["detector"]["crop"], cfg["infer"]["candidate_floor"])
        _sync(device)
        out["detect_s"] = time.perf_counter() - t0
        table = candidates_table(cands, grid_aff, swi_aff, cfg["infer"]["nms_radius_mm"])
        t1 = time.perf_counter()
        if kind == "ours":
            bombs = segment_image(seg, img, swi_aff, subject.get("seg_spacing"), device, cfg["segmenter"]["window"],
                                  cfg["segmenter"]["overlap"], cfg["segmenter"].get("sw_batch_size", 2))
        else:
            bombs = segment_monai(seg, img, device, cfg["segmenter"]["crop"])
        _sync(device)
        out["segment_s"] = time.perf_counter() - t1
        final = prune(table, (bombs, swi_aff), subject.get("mask"), threshold,
                      cfg["infer"]["prune_outside_mask"], cfg["infer"]["region_radius_mm"],
                      cfg["infer"].get("none_fraction", 1.0),
                      dark_voxels(img, subject["mask"][0], cfg["infer"].get("dark_fraction", 0.0))
                      if subject.get("mask") is not None else None)
        out["total_s"] = time.perf_counter() - t0
    out["peak_mb"] = mem.peak
    kept = final[final["pruned"] == "false"]
    out["n_floor"], out["n_threshold"], out["n_final"] = len(table), len(final), len(kept)
    out["points"] = table[["x", "y", "z"]].to_numpy()
    out["final_points"] = kept[["x", "y", "z"]].to_numpy()
    return out


def _row(res: str, name: str, r: dict, peak: float) -> str:
    frac = r["flops"] / r["detect_s"] / 1e9 / peak
    return (f"| {res} | {name} | {r['detect_s']:.1f} | {r['segment_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {frac:.2f} | {r['n_floor']} | {r['n_threshold']} | {r['n_final']} |")


def _matched(a: np.ndarray, b: np.ndarray, radius_mm: float) -> int:
    """How many points of ``a`` (RAS mm) lie within ``radius_mm`` of a point of ``b``."""
    if len(a) == 0 or len(b) == 0:
        return 0
    d, _ = cKDTree(b).query(a)
    return int((d <= radius_mm).sum())


def bench_resolution(res, det, seg, device, cfg, peak, threshold, window, with_monai=True, head=None,
                     seg_card=None):
    """Both engines on one subject (synthetic, or the simulated ``head``): table rows and a summary
    (``seg_card``: the trained segmenter's card; our engine segments on the grid the segment rule
    would use, :func:`microbleed.segment.inference_spacing`)."""
    from microbleed.segment import inference_spacing

    def seg_spacing(swi_aff):
        return (inference_spacing(seg_card, swi_aff, cfg["segmenter"].get("resample_to_trained_range", True))
                if seg_card else None)
    if res == "paper-head":
        from microbleed.data import load_detector_input
        vol, grid_aff = load_detector_input(head["detector_input"])
        subject = {"image": head["image"], "volume": vol, "swi_affine": head["swi_affine"],
                   "grid_affine": grid_aff, "mask_path": head["mask_path"], "mask": head["mask"], "grid": head["grid"],
                   "seg_spacing": seg_spacing(head["swi_affine"])}
        voxel = min(cfg["acquisitions"]["paper"]["voxel_mm"])
        what = (f"simulated head, SWI {head['swi_shape']} at {cfg['acquisitions']['paper']['voxel_mm']} mm, "
                f"{len(head['truth'])} true CMBs")
    else:
        img, vol, swi_aff, grid_aff = make_subject(res)
        subject = {"image": img, "volume": vol, "swi_affine": swi_aff, "grid_affine": grid_aff,
                   "seg_spacing": seg_spacing(swi_aff)}
        voxel = min(RESOLUTIONS[res][1])
        what = "synthetic noise filling the grid, no mask (every tile runs)"
    vol_shape = subject["volume"].shape[1:]
    plan = plan_tiles(vol_shape, window, cfg["infer"]["overlap"])
    ours = run_pipeline("ours", det, seg, subject, device, cfg, threshold, window)
    ours["flops"] = forward_flops(det, (1, 2, *plan.window)) * ours["tiles_run"]
    tiles = (f"ours {ours['tiles_run']} of {plan.n_tiles} tiles of {plan.window} (batch "
             f"{cfg['infer']['batch_size']}, BatchNorm folded)")
    if not with_monai:
        found = (f"; true CMBs within 5 mm of a final detection: {_matched(head['truth'], ours['final_points'], 5.0)} "
                 f"of {len(head['truth'])}, final detections within 5 mm of a true CMB: "
                 f"{_matched(ours['final_points'], head['truth'], 5.0)} of {ours['n_final']}"
                 if head is not None and res == "paper-head" else "")
        return [_row(res, "ours", ours, peak)], (f"- {res} ({what}): grid {vol_shape}, {tiles}; "
                                                  f"MONAI baseline not run (--no-monai){found}.")
    base = run_pipeline("monai", det, seg, subject, device, cfg, threshold, window)
    roi = cfg["detector"]["crop"]
    padded = [-(-n // 16) * 16 for n in vol_shape]
    n_monai = int(np.prod([max(1, -(-(p - r) // max(1, int(r * 0.75))) + 1) for p, r in zip(padded, roi)]))
    base["flops"] = forward_flops(det, (1, 2, *roi)) * n_monai
    radius = 2.0 * voxel
    summary = (f"- {res} ({what}): grid {vol_shape}, {tiles}; MONAI {n_monai} windows of {tuple(roi)}. "
               f"Speed-up {base['total_s'] / ours['total_s']:.2f}x (detection "
               f"{base['detect_s'] / ours['detect_s']:.2f}x). Detections >= floor after NMS: ours "
               f"{ours['n_floor']}, MONAI {base['n_floor']}, {_matched(ours['points'], base['points'], radius)} "
               f"of ours within 2 voxels ({radius:g} mm) of a MONAI one. Final detections (>= threshold "
               f"{threshold:.3f}, not pruned): ours {ours['n_final']}, MONAI {base['n_final']}, "
               f"{_matched(ours['final_points'], base['final_points'], radius)} of ours within 2 voxels of a MONAI one")
    if head is not None and res == "paper-head":
        summary += (f"; true CMBs within 5 mm of a final detection: ours "
                    f"{_matched(head['truth'], ours['final_points'], 5.0)}, MONAI "
                    f"{_matched(head['truth'], base['final_points'], 5.0)} of {len(head['truth'])}")
    return [_row(res, "ours", ours, peak), _row(res, "MONAI defaults", base, peak)], summary + "."


def _threshold(cfg: dict, card: dict) -> tuple[float, str]:
    """Operating threshold as the finalise rule reads it for one subject without a cohort threshold
    (config ``infer.threshold``; a speed benchmark has no cohort to adapt it to), 0.5 when the card
    cannot give it (random networks, or a card without a validation FROC)."""
    from microbleed.io import InputError
    from microbleed.train import operating_threshold
    setting = cfg["infer"]["threshold"]
    try:
        return (operating_threshold(setting, card, cfg["infer"].get("operating_fp_avg", 0.5),
                                    cfg["infer"]["candidate_floor"], cfg["infer"].get("operating_rule", "midpoint")), f"config infer.threshold {setting!r}")
    except InputError:
        return 0.5, f"config infer.threshold {setting!r} not available from this card: 0.5"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--resolutions", nargs="+", default=["demo", "paper", "paper-head"],
                    choices=[*RESOLUTIONS, "paper-head"])
    ap.add_argument("--models", default=str(ROOT / "results/models"),
                    help="folder with detector_rpn-ffm-hspl/ and segmenter_swi/ (random networks if absent)")
    ap.add_argument("--head-cache", default="/tmp/bench_head", help="cache of the simulated paper-resolution head")
    ap.add_argument("--paper-widths", nargs=5, type=int, default=[16, 32, 64, 128, 128],
                    help="detector widths at paper resolution; 0 0 0 0 0: the config's widths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-monai", action="store_true", help="skip the MONAI baseline (slow on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/infer.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    peak = conv_peak_gflops(device)
    load_start = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    lines = ["# Inference benchmark (detector + segmenter + pruning per subject)", "",
             f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; machine: {platform.node()} "
             f"{platform.machine()}, {args.threads} threads, device {device}"
             f"{' (' + torch.cuda.get_device_name(0) + ')' if device.type == 'cuda' else ''}; "
             f"torch {torch.__version__}; git {provenance()['git_commit']}",
             f"- load average (1, 5, 15 min) at start: {' '.join(load_start)} (shared machine)",
             f"- measured 3D-conv peak (32->32 ch, 64^3, channels_last_3d): {peak:.1f} GFLOP/s",
             f"- command: python benchmarks/bench_infer.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             ""]
    table = ["| subject | engine | detect s | segment s | total s | peak MB | conv-peak fraction "
             "| detections >= floor | >= threshold | final (not pruned) |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for res in args.resolutions:
        widths = cfg["detector"]["widths"] if res == "demo" or args.paper_widths == [0] * 5 else args.paper_widths
        det, seg, origin, card = networks(widths, cfg["segmenter"]["widths"], device, Path(args.models))
        window = _window_for(cfg["infer"]["window"], card or {"config": {"crop": cfg["detector"]["crop"]}})
        widths = card.get("config", {}).get("widths", widths)
        notes.append(f"- {res}: detector widths {list(widths)}, networks {origin}; our tile window {window} "
                     f"(infer.window {cfg['infer']['window']} capped by the detector's training crop)")
        threshold, how = _threshold(cfg, card)
        notes.append(f"- {res}: operating threshold {threshold:.3f} ({how})")
        grid = card_grid(card["config"]) if card.get("config") else grid_spec(cfg["preprocess"])
        head = (make_head(Path(args.head_cache), cfg, grid,
                          normalisation=card_normalisation(card["config"]) if card.get("config") else None)
                if res == "paper-head" else None)
        rows, summary = bench_resolution(res, det, seg, device, cfg, peak, threshold, window,
                                         not args.no_monai, head, card.get("segmenter_card"))
        table += rows
        notes.append(summary)
        print("\n".join(rows + [summary]), flush=True)
    notes.append(engine_check(device))
    load_end = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    notes.append(f"- load average (1, 5, 15 min) at end: {' '.join(load_end)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + table + [""] + notes) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
