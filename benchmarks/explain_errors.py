"""What the false positives are and why the missed CMBs were missed, on simulated cohorts.

For every evaluated subject of a simulated cohort, the final findings (``results/<cohort>/
sub-<id>/sub-<id>_cmb.tsv``: the operating threshold, pruning flags of the configured segmenter)
are matched one-to-one to the labelled CMBs within the hit radius
(:func:`microbleed.metrics.match_detections`, as in the metric tables). Then:

- each unmatched detection is attributed to the nearest object the simulator placed
  (``derivatives/truth/*_mimics.tsv``: ``calcification``, ``none_spot`` = a CMB-like spot in a
  ventricle or the choroid plexus, ``vein``; or a labelled CMB already matched = ``duplicate``)
  when it lies within the hit radius, else ``tissue``; kept and pruned ones are counted apart;
- each labelled CMB is ``found``, ``pruned`` (no kept finding matches it but one that pruning
  removed does; kept findings preferred in the matching, as the localisation table counts; with
  its reason and the region read there), ``below_threshold`` (the best raw candidate within the
  hit radius scored under the operating threshold; its score is given) or ``no_candidate``
  (nothing above the candidate floor), with its diameter, true region and how visible it is on
  the pre-processed SWI (:func:`local_contrast`: darkest core voxel, shell median, CNR).

This reads only outputs of a finished run (``make benchmark`` or ``snakemake``) and the
simulator's truth; it trains nothing and changes nothing.

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/explain_errors.py --results results
--cohorts bench-test bench-external [--source rpn+ffm+hspl] [--stem errors]``
Writes ``benchmarks/results/<stem>.tsv`` (one row per error) and ``<stem>.md`` (counts, machine, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import ndimage
from scipy.spatial.distance import cdist

from microbleed.cohort import simulated_root
from microbleed.infer import ball_offsets, dark_voxels, region_votes, sample_nearest
from microbleed.io import labels_path, load_volume, preproc_path, ras_to_voxel, read_tsv, voxel_sizes
from microbleed.metrics import match_detections

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def _truth(root: Path, subject: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled CMBs (x, y, z, diameter_mm, region) and mimics (x, y, z, kind) of one simulated subject."""
    cmb_tsv = root / "derivatives" / "cmb" / f"sub-{subject}" / f"sub-{subject}_cmb.tsv"
    mimics = read_tsv(root / "derivatives" / "truth" / f"sub-{subject}" / f"sub-{subject}_mimics.tsv",
                      required=["x", "y", "z", "kind"], numeric=["x", "y", "z"], subject=subject)
    cmb = (read_tsv(cmb_tsv, required=["x", "y", "z"], numeric=["x", "y", "z"], subject=subject)
           if cmb_tsv.exists() else pd.DataFrame(columns=["x", "y", "z", "diameter_mm", "region"]))
    return cmb, mimics


def _nearest(points: np.ndarray, objects: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Kind and distance (mm) of the nearest object to each point; ('', inf) without objects."""
    if len(points) == 0 or len(objects) == 0:
        return np.full(len(points), "", object), np.full(len(points), np.inf)
    d = cdist(points, objects[["x", "y", "z"]].to_numpy(float))
    k = d.argmin(axis=1)
    return objects["kind"].to_numpy(object)[k], d[np.arange(len(points)), k]


def local_contrast(swi: np.ndarray, affine: np.ndarray, ras: np.ndarray) -> dict[str, float]:
    """How visible a labelled CMB is on the pre-processed SWI: the darkest voxel within 0.6 voxel
    edges of its centre (``core_swi``), the median and spread of the 4-6 mm shell around it
    (``shell_swi``) and ``cnr = (shell median - core) / shell SD``."""
    ijk = np.rint(ras_to_voxel(np.asarray(ras, float).reshape(1, 3), affine)).astype(int)[0]
    off, d = ball_offsets(affine, 6.0)

    def values(sel: np.ndarray) -> np.ndarray:
        p = ijk + off[sel]
        p = p[np.all((p >= 0) & (p < np.asarray(swi.shape)), axis=1)]
        return swi[tuple(p.T)]

    core, shell = values(d <= 0.6 * voxel_sizes(affine).max()), values(d >= 4.0)
    if core.size == 0 or shell.size == 0:
        return {"core_swi": np.nan, "shell_swi": np.nan, "cnr": np.nan}
    sd = float(np.std(shell))
    return {"core_swi": round(float(core.min()), 3), "shell_swi": round(float(np.median(shell)), 3),
            "cnr": round((float(np.median(shell)) - float(core.min())) / sd, 2) if sd > 0 else np.nan}


def anatomy_reader(results: Path, cohort: str, subject: str, swi: np.ndarray | None, radius_mm: float,
                   dark_fraction: float):
    """A function of RAS mm points ``(N, 3)`` giving, per point, what pruning sees there: the share of
    ``none`` among the votes of the predicted BOMBS map in the ball of ``radius_mm`` (``none_pred``;
    voxels outside the brain mask or darker than ``dark_fraction`` x the brain's median SWI do not
    vote, as in :func:`microbleed.infer.prune`), the same share in the subject's label map
    (``none_true``, same voters) and the distance to the outside of the brain mask (``depth_mm``).
    ``swi``: the subject's pre-processed SWI data. ``None`` when an input is missing (a run without
    these outputs)."""
    sub = results / cohort / f"sub-{subject}"
    paths = {"pred": sub / f"sub-{subject}_desc-bombs_dseg.nii.gz",
             "mask": sub / f"sub-{subject}_desc-brain_mask.nii.gz",
             "true": labels_path(results, cohort, subject)}
    if swi is None or not all(p.exists() for p in paths.values()):
        return None
    pred, affine = load_volume(paths["pred"], subject, dtype=np.int64, allow_zero=True)
    true, true_affine = load_volume(paths["true"], subject, dtype=np.int64, allow_zero=True)
    mask, _ = load_volume(paths["mask"], subject, allow_zero=True)
    exclude = dark_voxels(swi, mask, dark_fraction)
    same_grid = true.shape == pred.shape and np.allclose(true_affine, affine, atol=1e-3)
    depth = ndimage.distance_transform_edt(np.pad(mask > 0, 1), sampling=voxel_sizes(affine))[1:-1, 1:-1, 1:-1]

    def share(votes: np.ndarray) -> np.ndarray:
        total = votes.sum(axis=1)
        return np.where(total > 0, votes[:, 0] / np.maximum(total, 1), np.nan)

    def read(ras: np.ndarray) -> dict[str, np.ndarray]:
        ras = np.asarray(ras, float).reshape(-1, 3)
        return {"none_pred": share(region_votes(pred, affine, ras, radius_mm, exclude=exclude)),
                "none_true": share(region_votes(true, true_affine, ras, radius_mm,
                                                exclude=exclude if same_grid else None)),
                "depth_mm": sample_nearest(depth, affine, ras, outside=0.0)}
    return read


def explain_subject(results: Path, cohort: str, subject: str, source: str, threshold: float,
                    hit_radius_mm: float, radius_mm: float = 6.0, dark_fraction: float = 0.6) -> list[dict]:
    """Error rows of one subject (see the module docstring)."""
    cmb, mimics = _truth(simulated_root(cohort, results), subject)
    final = read_tsv(results / cohort / f"sub-{subject}" / f"sub-{subject}_cmb.tsv",
                     required=["x", "y", "z", "score", "region", "pruned"], numeric=["x", "y", "z", "score"],
                     subject=subject)
    cand = read_tsv(results / cohort / "work" / f"sub-{subject}" / f"sub-{subject}_model-{source.replace('+', '-')}_candidates.tsv",
                    required=["x", "y", "z", "score"], numeric=["x", "y", "z", "score"], subject=subject)
    det = final[["x", "y", "z"]].to_numpy(float).reshape(-1, 3)
    lab = cmb[["x", "y", "z"]].to_numpy(float).reshape(-1, 3)
    pruned = final["pruned"].astype(str).str.lower().eq("true").to_numpy()
    # as the localisation table: one assignment finding as many CMBs as all findings can, using
    # the most kept ones (a CMB also hit by a pruned duplicate is judged on the kept finding)
    match = match_detections(det, lab, hit_radius_mm, second_choice=pruned)
    det_hit = match.det_hit
    pairs = [(int(d), int(m)) for d, m in match.pairs]
    rows = []
    objects = pd.concat([mimics[["x", "y", "z", "kind"]], cmb[["x", "y", "z"]].assign(kind="duplicate")])
    kind, dist = _nearest(det, objects)
    for n in np.flatnonzero(~det_hit):
        near = kind[n] if dist[n] <= hit_radius_mm else "tissue"
        rows.append({"cohort": cohort, "subject": subject, "error": "fp_pruned" if pruned[n] else "fp_kept",
                     "cause": near, "score": round(float(final["score"].iloc[n]), 4),
                     "region_read": final["region"].iloc[n],
                     "prune_reason": final["prune_reason"].iloc[n] if "prune_reason" in final else "",
                     "distance_mm": round(float(dist[n]), 2) if np.isfinite(dist[n]) else "",
                     "x": det[n, 0], "y": det[n, 1], "z": det[n, 2]})
    by_label = {lab_i: det_i for det_i, lab_i in pairs}
    swi_path = preproc_path(results, cohort, subject, "preproc_swi")
    swi = load_volume(swi_path, subject) if swi_path.exists() else None
    anatomy = anatomy_reader(results, cohort, subject, None if swi is None else swi[0], radius_mm, dark_fraction)
    cpts = cand[["x", "y", "z"]].to_numpy(float).reshape(-1, 3)
    for m in range(len(lab)):
        base = {"cohort": cohort, "subject": subject, "x": lab[m, 0], "y": lab[m, 1], "z": lab[m, 2],
                "diameter_mm": cmb["diameter_mm"].iloc[m] if "diameter_mm" in cmb else "",
                "true_region": cmb["region"].iloc[m] if "region" in cmb else "",
                **(local_contrast(swi[0], swi[1], lab[m]) if swi is not None else {})}
        if m in by_label:
            n = by_label[m]
            if pruned[n]:
                rows.append({**base, "error": "fn", "cause": "pruned", "score": round(float(final["score"].iloc[n]), 4),
                             "_probe": det[n],                # pruning read the anatomy at the finding
                             "region_read": final["region"].iloc[n],
                             "prune_reason": final["prune_reason"].iloc[n] if "prune_reason" in final else ""})
            continue
        near = cdist(lab[m:m + 1], cpts)[0] <= hit_radius_mm if len(cpts) else np.zeros(0, bool)
        best = float(cand["score"].to_numpy(float)[near].max()) if near.any() else float("nan")
        cause = "no_candidate" if not near.any() else ("below_threshold" if best < threshold else "lost_in_nms")
        rows.append({**base, "error": "fn", "cause": cause, "score": round(best, 4) if near.any() else ""})
    if anatomy is not None and rows:
        seen = anatomy(np.array([r.get("_probe", [r["x"], r["y"], r["z"]]) for r in rows], float))
        for n, row in enumerate(rows):
            row.update({k: round(float(v[n]), 2) for k, v in seen.items()})
    for row in rows:
        row.pop("_probe", None)
    return rows


def _threshold(evaluate_log: Path) -> float:
    """The operating threshold the run used, from the cohort's evaluate_cohort log."""
    for line in evaluate_log.read_text().splitlines() if evaluate_log.exists() else []:
        if "operating threshold" in line:
            return float(line.split("operating threshold")[1].split()[0])
    raise SystemExit(f"no 'operating threshold' line in {evaluate_log}: run the evaluation first")


def main(results: Path, cohorts: list[str], source: str, hit_radius_mm: float, stem: str,
         radius_mm: float | None = None, dark_fraction: float | None = None) -> pd.DataFrame:
    infer = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["infer"]
    radius_mm = float(infer["region_radius_mm"] if radius_mm is None else radius_mm)
    dark_fraction = float(infer["dark_fraction"] if dark_fraction is None else dark_fraction)
    rows = []
    for cohort in cohorts:
        threshold = _threshold(results / "logs" / "evaluate_cohort" / f"{cohort}.log")
        subjects = sorted(p.name[4:] for p in (results / cohort).glob("sub-*") if p.is_dir())
        if not subjects:
            raise SystemExit(f"no subject folder under {results / cohort}")
        for sub in subjects:
            rows += explain_subject(results, cohort, sub, source, threshold, hit_radius_mm, radius_mm, dark_fraction)
        rows.append({"cohort": cohort, "subject": "", "error": "threshold", "score": threshold,
                     "cause": f"{len(subjects)} subjects"})
    table = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT / f"{stem}.tsv", sep="\t", index=False)
    errs = table[table["error"] != "threshold"]
    counts = errs.groupby(["cohort", "error", "cause"]).size().rename("n").reset_index()
    lines = [f"# Errors of the full framework, by cause ({source}, {results})", "",
             f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()} ({platform.machine()}, {platform.platform()})",
             f"- command: `benchmarks/explain_errors.py --results {results} --cohorts {' '.join(cohorts)} "
             f"--source {source} --stem {stem}`",
             f"- operating thresholds: " + ", ".join(
                 f"{r.cohort} {r.score:.4f}" for r in table[table["error"] == "threshold"].itertuples()),
             "- fp_kept: false positives in the final findings; fp_pruned: removed by pruning (harmless);",
             "  fn: labelled CMBs not in the final findings. One row per error in "
             f"`benchmarks/results/{stem}.tsv`.",
             f"- none_pred / none_true: share of `none` among the votes of the predicted / labelled BOMBS map "
             f"within {radius_mm:g} mm (voxels outside the brain mask or darker than {dark_fraction:g} x its "
             "median SWI do not vote, as in pruning), read at the finding for a pruned CMB, else at the "
             "label or the false positive; depth_mm: distance to the outside of the brain mask there.", "",
             "| cohort | error | cause | n |", "|---|---|---|---|"]
    lines += [f"| {r.cohort} | {r.error} | {r.cause} | {r.n} |" for r in counts.itertuples()]
    fn = errs[errs["error"] == "fn"]
    if len(fn) and "cnr" in fn:
        extra = [c for c in ("none_pred", "none_true", "depth_mm") if c in fn]
        lines += ["", "Missed CMBs (diameter mm, SWI core / shell, CNR" + (", what pruning saw" if extra else "") + "):", "",
                  "| cohort | subject | cause | diameter_mm | true_region | core_swi | shell_swi | cnr |"
                  + "".join(f" {c} |" for c in extra),
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
        lines += [f"| {r.cohort} | {r.subject} | {r.cause} | {float(r.diameter_mm):.1f} | {r.true_region} | "
                  f"{r.core_swi} | {r.shell_swi} | {r.cnr} |" + "".join(f" {getattr(r, c)} |" for c in extra)
                  for r in fn.itertuples()]
        fp = errs[errs["error"].isin(["fp_kept", "fp_pruned"])]
        if len(fp) and extra:
            lines += ["", "False positives (what pruning saw):", "",
                      "| cohort | subject | error | cause | score | " + " | ".join(extra) + " |",
                      "|---|---|---|---|---|" + "---|" * len(extra)]
            lines += [f"| {r.cohort} | {r.subject} | {r.error} | {r.cause} | {r.score} | "
                      + " | ".join(str(getattr(r, c)) for c in extra) + " |" for r in fp.itertuples()]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--cohorts", nargs="+", default=["bench-test", "bench-external"])
    ap.add_argument("--source", default="rpn+ffm+hspl", help="detector whose raw candidates explain the misses")
    ap.add_argument("--hit-radius-mm", type=float, default=5.0)
    ap.add_argument("--stem", default="errors")
    ap.add_argument("--region-radius-mm", type=float, help="pruning ball (default: config/config.yaml infer)")
    ap.add_argument("--dark-fraction", type=float, help="dark voxels do not vote (default: config/config.yaml infer)")
    a = ap.parse_args()
    main(a.results, a.cohorts, a.source, a.hit_radius_mm, a.stem, a.region_radius_mm, a.dark_fraction)
