"""Run the benchmark configuration and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py --config config/benchmark.yaml [--cores N] [--collect-only]
    python benchmarks/run_all.py --override benchmarks/experiments/<name>.yaml --out benchmarks/experiments/<name>.md

For each segmenter input (``--segmenter-inputs``, default ``swi t1``) the
workflow runs once with that input (a merged copy of the config under
``results/benchmark/``), with ``--keep-going``; after each run the metric tables
of every evaluated cohort are copied to ``results/benchmark/segin-<input>/<cohort>/``.
Then the tables are assembled, shaped like the paper's Tables 1-3 with the
paper's numbers beside ours (``ours (paper)``), plus the FROC summary, the
machine, date, git commit and wall time; then what each model's training cost
and kept (``results/benchmark/models/``) and where the time went, per rule
(Snakemake's ``benchmark:`` records of each pass, ``results/benchmark/jobs-<input>/``).

The first cohort of ``evaluate_cohorts`` is the *internal* test set (the
paper's GMC), the others *external* (SNUH), unless ``--internal``/``--external``
say otherwise.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("detection", "localization", "framework", "froc")

# The paper's numbers (seed/paper.md Tables 1-3, Fig. 9; summarised in METHOD.md section 6).
# Detection: (sens %, prec %, FP_avg) for subjects with CMBs, FP_avg normals, then external (sens, prec, FP_avg).
PAPER_DETECTION: dict[str, tuple] = {
    "rpn": (93.33, 17.11, 14.73, 12.07, 94.21, 16.83, 15.39),
    "rpn+ffm": (93.33, 25.64, 8.82, 9.00, 93.89, 22.70, 10.57),
    "rpn+ffm+hspl": (94.66, 78.02, 0.86, 0.85, 93.89, 60.70, 2.01),
    "rpn+ffm+hspl+pruning(swi)": (94.66, 84.52, 0.56, 0.64, 92.60, 67.92, 1.44),
    "rpn+ffm+hspl+pruning(t1)": (94.66, 85.54, 0.52, 0.57, None, None, None),
    "two-stage YOLOv2 + 3D CNN (paper only)": (88.00, 61.11, 1.75, 1.85, 86.81, 55.78, 2.27),
}
# Localisation: (Dice, LA) per class and total; EFP_avg in the total row.
PAPER_LOCALIZATION: dict[tuple[str, str], dict[str, tuple]] = {
    ("internal", "swi"): {"lobar": (0.9043, 0.97), "deep": (0.8544, 1.0), "infratentorial": (0.9251, 1.0),
                          "total": (0.8946, 0.98, 0.30)},
    ("internal", "t1"): {"lobar": (0.9491, 1.0), "deep": (0.8846, 0.91), "infratentorial": (0.9518, 1.0),
                         "total": (0.9272, 0.98, 0.34)},
    ("external", "swi"): {"lobar": (None, 0.97), "deep": (None, 0.95), "infratentorial": (None, 0.97),
                          "total": (None, 0.97, 0.28)},
}
PAPER_AUC_PR = {"rpn": 0.75, "rpn+ffm": 0.79, "rpn+ffm+hspl": 0.94}


def _cell(ours: Any, paper: Any, scale: float = 1.0, digits: int = 2) -> str:
    """``ours (paper)``; ``n/a`` for missing values."""
    def fmt(v: Any, s: float) -> str:
        try:
            v = float(v)
        except (TypeError, ValueError):
            return "n/a"
        return "n/a" if v != v else f"{v * s:.{digits}f}"
    text = fmt(ours, scale)
    return text if paper is None else f"{text} ({fmt(paper, 1.0)})"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def collect(snapshot_root: str | Path) -> dict[tuple[str, str], dict[str, pd.DataFrame]]:
    """Read ``<snapshot_root>/segin-<input>/<cohort>/<table>.tsv`` -> ``{(input, cohort): {table: df}}``."""
    out: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
    for seg_dir in sorted(Path(snapshot_root).glob("segin-*")):
        for cohort_dir in sorted(p for p in seg_dir.iterdir() if p.is_dir()):
            tables = {n: pd.read_csv(cohort_dir / f"{n}.tsv", sep="\t") for n in TABLES
                      if (cohort_dir / f"{n}.tsv").exists()}
            if tables:
                out[(seg_dir.name.removeprefix("segin-"), cohort_dir.name)] = tables
    return out


def _detection_rows(found: Mapping[tuple[str, str], dict[str, pd.DataFrame]], internal: str,
                    external: Sequence[str]) -> list[list[str]]:
    """Table 1 + 3 rows: method, internal (sens, prec, FP_avg cmb, FP_avg normal), first external (the same
    four; the paper's external set had no normal subjects, so its cell there is ours alone)."""
    by_method: dict[str, dict[str, pd.DataFrame]] = {}
    for (segin, cohort), tables in found.items():
        det = tables.get("detection")
        if det is None:
            continue
        for method, rows in det.groupby("method", sort=False):
            if "pruning(" in method and f"pruning({segin})" not in method:
                continue
            by_method.setdefault(method, {})[cohort] = rows.set_index("group")
    ext = external[0] if external else None
    out = []
    for method in [*by_method, *(m for m in PAPER_DETECTION if m not in by_method)]:
        paper = PAPER_DETECTION.get(method, (None,) * 7)
        cells = [method]
        groups, keys = ("cmb", "cmb", "cmb", "normal"), ("sensitivity", "precision", "fp_avg", "fp_avg")
        for cohort, papers in ((internal, paper[:4]), (ext, (*paper[4:7], None))):
            t = by_method.get(method, {}).get(cohort)
            for g, k, p in zip(groups, keys, papers):
                ours = t.loc[g, k] if t is not None and g in t.index else None
                cells.append(_cell(ours, p, 100.0 if k != "fp_avg" else 1.0))
        out.append(cells)
    return out


def _counts(r) -> str:
    """``correct/detected`` of a localisation row; empty where the row has none (the ``none`` class)."""
    c, d = r.get("n_correct"), r.get("n_detected")
    return "" if c is None or d is None or pd.isna(c) or pd.isna(d) else f"{int(c)}/{int(d)}"


def _localization_rows(found, internal: str, external: Sequence[str]) -> list[list[str]]:
    rows = []
    for (segin, cohort), tables in sorted(found.items()):
        loc = tables.get("localization")
        if loc is None:
            continue
        kind = "internal" if cohort == internal else "external" if cohort in external else None
        paper = PAPER_LOCALIZATION.get((kind, segin), {})
        efp_cmb = _pruned_fp_avg(tables.get("framework"), "cmb")
        for _, r in loc.iterrows():
            p = paper.get(r["region"], (None, None, None))
            total = r["region"] == "total"
            efp = _cell(efp_cmb, p[2] if len(p) > 2 else None) if total else ""
            rows.append([cohort, segin, r["region"], _cell(r.get("dice_mean"), p[0], digits=3),
                         _cell(r.get("la"), p[1]), _counts(r), efp, _cell(r.get("efp_avg"), None) if total else ""])
    return rows


def _pruned_fp_avg(framework: pd.DataFrame | None, group: str) -> float | None:
    """False positives removed by pruning per subject of ``group`` (framework.tsv's pruning row): the
    paper's GMC EFP_avg is the drop of FP_avg on its subjects with CMBs (0.86 - 0.56 = 0.30 SWI,
    0.86 - 0.52 = 0.34 T1, Tables 2-3), so Table 2 compares ``cmb`` with it."""
    col = f"efp_avg_{group}"
    if framework is None or col not in framework.columns:
        return None
    rows = framework[framework["task"].astype(str).str.contains("pruning")]
    return None if rows.empty else float(rows[col].iloc[0])


def _froc_rows(found) -> list[list[str]]:
    rows = []
    for (segin, cohort), tables in sorted(found.items()):
        froc = tables.get("froc")
        if froc is None:
            continue
        for _, r in froc.iterrows():
            if "pruning(" in r["method"] and f"pruning({segin})" not in r["method"]:
                continue
            if segin != "swi" and "pruning(" not in r["method"]:
                continue                                    # detector-only curves do not depend on the segmenter
            pts = [_cell(r.get(f"sens_at_{p}"), None) for p in ("0.125", "0.25", "0.5", "1", "2", "4", "8")]
            rows.append([cohort, r["method"], *pts, _cell(r.get("mean_sensitivity"), None),
                         _cell(r.get("auc_pr"), PAPER_AUC_PR.get(r["method"])),
                         _cell(r.get("fp_avg_at_sens_0.9"), None), _cell(r.get("fp_avg_at_sens_0.95"), None)])
    return rows


def render_results(found: Mapping[tuple[str, str], dict[str, pd.DataFrame]], internal: str,
                   external: Sequence[str], meta: Mapping[str, Any]) -> str:
    """RESULTS.md text: run facts, then Tables 1/3, 2 and the FROC summary (``ours (paper)``)."""
    facts = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    det_head = ["method", f"{internal} sens %", "prec %", "FP_avg", "FP_avg normal",
                f"{external[0] if external else 'external'} sens %", "prec %", "FP_avg", "FP_avg normal"]
    loc_head = ["cohort", "segmenter input", "region", "Dice", "LA", "correct/detected", "EFP_avg (subjects with CMBs)",
                "EFP_avg (all subjects)"]
    froc_head = ["cohort", "method", "@1/8", "@1/4", "@1/2", "@1", "@2", "@4", "@8", "mean", "AUC-PR",
                 "FP_avg @90 %", "FP_avg @95 %"]
    return "\n\n".join([
        "# Benchmark results",
        "Cells read `ours (paper)`; the paper's numbers are from its Tables 1-3 and Fig. 9 "
        "(GMC internal / SNUH external, real data), ours from the simulated benchmark cohorts: "
        "they are shown side by side, not claimed equal. Sensitivity and precision in %, FP_avg per subject.",
        facts,
        "## Detection (paper Tables 1 and 3)", _md(det_head, _detection_rows(found, internal, external)),
        "## Anatomical localisation (paper Table 2)", _md(loc_head, _localization_rows(found, internal, external)),
        "## FROC: sensitivity at FP_avg, mean, AUC-PR (paper Fig. 9); FP_avg needed for 90 % and 95 % "
        "sensitivity (matched-sensitivity comparison of the variants; inf: never reached)",
        _md(froc_head, _froc_rows(found)),
    ]) + "\n"


def copy_plots(snapshot_root: str | Path, dest: str | Path) -> list[Path]:
    """Copy each snapshot's FROC, PR and count plots (``segin-<input>/<cohort>/{froc,pr,counts}.png``) to
    ``dest/<cohort>_<input>_{froc,pr,counts}.png`` (results/ is not versioned; benchmarks/ is); older
    plots in ``dest`` are removed first, so the folder holds this run's only. Returns the copies."""
    dest = Path(dest)
    for old in dest.glob("*.png"):
        old.unlink()
    copies = []
    for png in sorted(Path(snapshot_root).glob("segin-*/*/*.png")):
        if png.stem in ("froc", "pr", "counts"):
            target = dest / f"{png.parent.name}_{png.parent.parent.name.removeprefix('segin-')}_{png.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            copies.append(target)
    return copies


def plots_section(copies: Sequence[Path], out_dir: Path) -> str:
    """Markdown image links to ``copies``, relative to the folder of RESULTS.md."""
    if not copies:
        return ""
    lines = ["", "## Plots (FROC, precision-recall and per-subject counts per cohort and segmenter input)", ""]
    lines += [f"![{p.stem}]({os.path.relpath(p, out_dir)})" for p in copies]
    return "\n".join(lines) + "\n"


def snapshot_models(models_dir: str | Path, snapshot_root: str | Path) -> None:
    """Copy each model's ``card.json`` and ``train_log.csv`` (``results/models/<name>/``) to
    ``snapshot_root/models/<name>/``, beside the metric snapshots, so that the training account of
    RESULTS.md can be re-assembled from the snapshot alone."""
    for card in sorted(Path(models_dir).glob("*/card.json")):
        dst = Path(snapshot_root) / "models" / card.parent.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("card.json", "train_log.csv"):
            if (card.parent / name).exists():
                shutil.copyfile(card.parent / name, dst / name)


def snapshot_jobs(bench_dir: str | Path, snapshot_root: str | Path, segin: str, since: float) -> int:
    """Copy the Snakemake ``benchmark:`` records (``results/benchmarks/<rule>/<job>.tsv``) written since
    ``since`` (epoch seconds: the start of the pass) to ``snapshot_root/jobs-<segin>/<rule>/``, so
    that each pass keeps its own jobs (the t1 pass re-runs ``segment`` onto the same paths).
    Returns the number of records copied."""
    dst_root = Path(snapshot_root) / f"jobs-{segin}"
    shutil.rmtree(dst_root, ignore_errors=True)
    n = 0
    for tsv in sorted(Path(bench_dir).glob("*/*.tsv")):
        if tsv.stat().st_mtime >= since:
            dst = dst_root / tsv.parent.name / tsv.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tsv, dst)
            n += 1
    return n


def time_section(snapshot_root: str | Path) -> str:
    """Where the wall time went: per pass and rule, the jobs run, their summed and median wall
    seconds (Snakemake's ``s``) and the largest peak memory (``max_rss``, MB), from
    ``snapshot_root/jobs-<segin>/`` (:func:`snapshot_jobs`); jobs ran up to ``--cores`` at a time,
    so the sums add to more than the pass's wall time when jobs overlapped. Empty without records."""
    rows, total = [], 0.0
    for pass_dir in sorted(Path(snapshot_root).glob("jobs-*")):
        for rule_dir in sorted(p for p in pass_dir.iterdir() if p.is_dir()):
            tables = [pd.read_csv(t, sep="\t") for t in sorted(rule_dir.glob("*.tsv"))]
            tables = [t for t in tables if not t.empty and "s" in t]
            if not tables:
                continue
            jobs = pd.concat(tables, ignore_index=True)
            secs = pd.to_numeric(jobs["s"], errors="coerce")
            rss = pd.to_numeric(jobs.get("max_rss"), errors="coerce") if "max_rss" in jobs else pd.Series([float("nan")])
            total += secs.sum()
            rows.append([pass_dir.name.removeprefix("jobs-"), rule_dir.name, str(len(jobs)), f"{secs.sum() / 60:.1f}",
                         f"{secs.median():.1f}", "n/a" if rss.isna().all() else f"{rss.max():.0f}"])
    if not rows:
        return ""
    rows.sort(key=lambda r: -float(r[3]))
    head = ["pass", "rule", "jobs", "job minutes (sum)", "median s per job", "peak memory MB"]
    return ("\n## Where the time went (Snakemake benchmark records, per pass and rule)\n\n"
            + _md(head, rows) + f"\n\nSum over all jobs: {total / 60:.1f} min.\n")


def _validation_curve(log: pd.DataFrame) -> tuple[str, pd.Series]:
    """(column, scores by epoch) of the model-selection score in a training log: the detector's
    validation FROC mean (``val_score``), the segmenter's whole-volume mean Dice of lobar, deep and
    infratentorial after each check's class offsets (``val_volume_offset_dice_total``; logs of
    older segmenters: the plain ``val_volume_dice_total``)."""
    for col in ("val_volume_offset_dice_total", "val_volume_dice_total", "val_score"):
        if col in log and pd.to_numeric(log[col], errors="coerce").notna().any():
            curve = pd.to_numeric(log[col], errors="coerce")
            return col, pd.Series(curve.to_numpy(), index=log["epoch"]).dropna()
    crop = [f"val_dice_{c}" for c in ("lobar", "deep", "infratentorial")]
    if all(c in log for c in crop):   # segmenter selected on validation crops (volume_validation_every 0)
        curve = log[crop].apply(pd.to_numeric, errors="coerce").mean(axis=1, skipna=True)
        return "val_dice_crops", pd.Series(curve.to_numpy(), index=log["epoch"]).dropna()
    return "", pd.Series(dtype=float)


def _card_best_epoch(card_path: Path) -> int | None:
    """The epoch whose weights a model card says were kept (detector: ``selection.best_epoch``,
    segmenter: ``best_epoch``), None when the card does not say."""
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    sel = card.get("selection")
    best = sel.get("best_epoch") if isinstance(sel, Mapping) else card.get("best_epoch")
    return int(best) if isinstance(best, (int, float)) and best > 0 else None


def training_section(models_dir: str | Path) -> str:
    """What training cost and what it chose, per model (``<models_dir>/<name>/{card.json,train_log.csv}``):
    epochs run, the epoch the selection rule kept (the best validation score; ties: the later
    epoch), that score, the score at every validation check, and the minutes of training (sum of
    the log's per-epoch seconds, validation included). Empty when no model has a log."""
    rows = []
    for log_path in sorted(Path(models_dir).glob("*/train_log.csv")):
        log = pd.read_csv(log_path)
        if log.empty or "epoch" not in log:
            continue
        col, curve = _validation_curve(log)
        best = _card_best_epoch(log_path.parent / "card.json")   # what training kept (NaN-scored too)
        if best is None:
            best = curve[curve == curve.max()].index.max() if len(curve) else None
        score = {"val_score": "validation FROC mean", "val_dice_crops": "validation crop Dice (lobar, deep, infra.)"
                 }.get(col, "validation Dice (lobar, deep, infra.)")
        checks = ", ".join(f"{int(e)}: {v:.3f}" for e, v in curve.items())
        minutes = pd.to_numeric(log.get("seconds"), errors="coerce").sum() / 60 if "seconds" in log else float("nan")
        rows.append([log_path.parent.name, str(int(log["epoch"].max())),
                     "n/a" if best is None else str(int(best)),
                     "n/a" if best is None else f"{curve.get(best, float('nan')):.3f} ({score})", checks or "n/a",
                     f"{minutes:.1f}"])
    if not rows:
        return ""
    head = ["model", "epochs", "kept epoch", "its score", "score at each check (epoch: score)", "training min"]
    return "\n## Training (what each model cost and which epoch it kept)\n\n" + _md(head, rows) + "\n"


def notes_section(path: Path) -> str:
    """The hand-written account of the run (``benchmarks/notes/<RESULTS stem>.md``: how it was made,
    what changed since the last one, which targets are met), kept in its own file so that
    re-assembling the tables does not erase it; empty when there is none."""
    if not path.exists():
        return ""
    return f"\n<!-- from {path.parent.name}/{path.name}, written by hand -->\n{path.read_text().strip()}\n"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, mapping by mapping (as Snakemake merges config files);
    lists and scalars of ``override`` replace those of ``base``."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
                    else value)
    return out


def load_config(config_path: Path, overrides: Sequence[Path] = ()) -> dict[str, Any]:
    """The benchmark config with each override file (an experiment: only the keys it changes) merged in order."""
    cfg = yaml.safe_load(config_path.read_text())
    for path in overrides:
        cfg = deep_merge(cfg, yaml.safe_load(Path(path).read_text()) or {})
    return cfg


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def run_workflow(config_path: Path, segin: str, cores: int, snapshot_root: Path,
                 extra_args: Sequence[str] = (), overrides: Sequence[Path] = ()) -> tuple[float, int]:
    """Run Snakemake with ``segmenter.input = segin`` (plus ``extra_args``); snapshot the metric tables.
    Returns (seconds, exit code)."""
    cfg = load_config(config_path, overrides)
    cfg.setdefault("segmenter", {})["input"] = segin
    merged = snapshot_root / f"config_{segin}.yaml"
    merged.parent.mkdir(parents=True, exist_ok=True)
    merged.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--profile", "workflow/profiles/default",
           "--configfile", str(merged), "--cores", str(cores), "--keep-going", *extra_args]
    cohorts = cfg.get("evaluate_cohorts", [])
    tables = {c: ROOT / "results" / c / "metrics" / "detection.tsv" for c in cohorts}
    before = {c: _mtime(t) for c, t in tables.items()}
    start = time.time()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    for cohort in cohorts:
        src, dst = tables[cohort].parent, snapshot_root / f"segin-{segin}" / cohort
        after = _mtime(tables[cohort])
        # current: rewritten by this pass, or left as they were by a pass that succeeded (up to date)
        current = after is not None and (after != before[cohort] or code == 0)
        shutil.rmtree(dst, ignore_errors=True)
        if current:
            shutil.copytree(src, dst)
        else:  # the pass did not evaluate this cohort (a job failed under --keep-going): no stale tables
            print(f"run_all: {segin} pass wrote no metrics for {cohort}; its rows are left empty", file=sys.stderr)
    snapshot_models(ROOT / "results" / "models", snapshot_root)
    snapshot_jobs(ROOT / "results" / "benchmarks", snapshot_root, segin, start)
    return time.time() - start, code


def speed_sections(results_dir: str | Path) -> str:
    """The speed/resource reports of the other benchmark scripts (``benchmarks/results/*.md``), headings demoted.

    Each file was written by the script it names, with its machine and date; they
    are gathered here so RESULTS.md is the one page to read.
    """
    parts = []
    for md in sorted(Path(results_dir).glob("*.md")):
        text = md.read_text().strip()
        text = "\n".join(("##" + line) if line.startswith("#") else line for line in text.splitlines())
        parts.append(f"<!-- from benchmarks/results/{md.name} -->\n{text}\n")
    if not parts:
        return ""
    return SPEED_HEADING + "\n" + "\n".join(parts)


SPEED_HEADING = "\n## Speed and resources (per script)\n"
PLOTS_HEADING = "\n## Plots ("


def refresh_sections(text: str, notes: str, speed: str) -> str:
    """``text`` (a RESULTS page written by :func:`main`) with its hand-written notes and its
    per-script speed sections replaced by ``notes`` and ``speed``; the run's tables, training and
    time sections and its plot links are kept as they are. For a page whose run's snapshot
    (``results/benchmark``) is gone when a notes file or a ``benchmarks/results/*.md`` changed.

    Raises:
        ValueError: ``text`` has no run tables (no ``## Detection`` section).
    """
    if "\n## Detection" not in text:
        raise ValueError("not a RESULTS page of run_all.py: no '## Detection' section to keep")
    cut = [i for i in (text.find("\n<!-- from notes/"), text.find(PLOTS_HEADING), text.find(SPEED_HEADING))
           if i >= 0]
    head = text[:min(cut)] if cut else text
    plots = ""
    if PLOTS_HEADING in text:
        start = text.index(PLOTS_HEADING)
        end = text.find(SPEED_HEADING, start)
        plots = text[start:end if end >= 0 else len(text)].rstrip("\n") + "\n"
    return head.rstrip("\n") + "\n" + notes + plots + speed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/benchmark.yaml")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--override", nargs="*", default=[],
                    help="experiment files merged onto --config in order (only the keys they change), "
                         "e.g. benchmarks/experiments/detector_scale.yaml")
    ap.add_argument("--segmenter-inputs", nargs="+", default=["swi", "t1"], choices=["swi", "t1"])
    ap.add_argument("--internal", help="internal test cohort (default: first of evaluate_cohorts)")
    ap.add_argument("--external", nargs="*", help="external cohorts (default: the other evaluate_cohorts)")
    ap.add_argument("--collect-only", action="store_true", help="do not run Snakemake, only assemble tables")
    ap.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[],
                    help="passed on to Snakemake (last option), e.g. --rerun-triggers mtime to keep "
                         "outputs of an earlier run whose code or parameters changed without effect")
    ap.add_argument("--sections-only", action="store_true",
                    help="keep --out's run tables and plot links, re-read only its hand-written notes and "
                         "the benchmarks/results/*.md sections (the run's snapshot is not needed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.sections_only:
        out = Path(args.out).resolve()
        notes = notes_section(out.parent / "notes" / f"{out.stem}.md")
        out.write_text(refresh_sections(out.read_text(), notes, speed_sections(ROOT / "benchmarks" / "results")))
        print(f"refreshed the notes and per-script sections of {args.out}")
        return 0
    config_path = (ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    overrides = [Path(o) if Path(o).is_absolute() else ROOT / o for o in args.override]
    cohorts = load_config(config_path, overrides).get("evaluate_cohorts", [])
    internal = args.internal or (cohorts[0] if cohorts else "")
    external = args.external if args.external is not None else [c for c in cohorts if c != internal]
    snapshot_root = ROOT / "results" / "benchmark"
    walls, codes = {}, {}
    if not args.collect_only:
        for segin in args.segmenter_inputs:
            walls[segin], codes[segin] = run_workflow(config_path, segin, args.cores, snapshot_root,
                                                      args.snakemake_args, overrides)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit(),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()})",
            "config": args.config + "".join(f" + {o}" for o in args.override) + (f" (Snakemake {' '.join(args.snakemake_args)})" if args.snakemake_args else ""),
            "wall time": ", ".join(f"{k}: {v / 60:.1f} min (exit {codes[k]})" for k, v in walls.items()) or "n/a"}
    found = {k: v for k, v in collect(snapshot_root).items()       # configured inputs and cohorts only
             if k[0] in args.segmenter_inputs and k[1] in cohorts}
    text = render_results(found, internal, external, meta)
    models = snapshot_root / "models"
    text += training_section(models if models.is_dir() else ROOT / "results" / "models")
    text += time_section(snapshot_root)
    if not overrides:  # an experiment's page holds its own tables and training only
        out_dir = Path(args.out).resolve().parent
        text += notes_section(out_dir / "notes" / f"{Path(args.out).stem}.md")
        text += plots_section(copy_plots(snapshot_root, out_dir / "plots" / Path(args.out).stem), out_dir)
        text += speed_sections(ROOT / "benchmarks" / "results")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return max(codes.values(), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
