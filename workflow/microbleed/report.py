"""Cohort evaluation tables, FROC/PR plots and the self-contained HTML report.

The evaluation reads, per subject, the final findings (``sub-<id>_cmb.tsv``:
the configured detector at its operating threshold, with predicted region and
``pruned`` flag), the raw candidates of every evaluated method
(``work/sub-<id>/sub-<id>_model-<slug>_candidates.tsv``, score >= 0.05, for
the FROC/PR curves), the labels (``x, y, z`` RAS mm[, ``region``]) and the
predicted / aseg-derived BOMBS maps (Dice). Metrics are defined in
:mod:`microbleed.metrics`. With ``evaluate.allow_missing`` (:class:`EvalOptions`),
a subject with a missing or unreadable file (:class:`~microbleed.io.InputError`,
``OSError``) is *excluded* from every table and listed with the reason, and the
cohort tables are still written; without it, such a subject fails the cohort.
Any other error (a bug) always propagates.

Anatomical pruning of raw candidates (for the "+pruning" curves and for
methods other than the configured one) is :func:`microbleed.infer.prune`, the
very function that writes the final table (METHOD.md section 5): region
``none`` in the predicted BOMBS map, or outside the brain mask when
``infer.prune_outside_mask``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from .io import InputError, load_volume, ras_to_voxel, read_tsv, write_tsv
from .metrics import (FROC_FP_POINTS, REGIONS, SubjectData, bombs_region_tally, count_agreement, float_values,
                      detection_table, dice_per_class, eliminated_fp, froc_curve, froc_summary,
                      localization_accuracy, pr_auc, region_name)

__all__ = ["Method", "SubjectFiles", "parse_methods", "evaluate_cohort", "write_metrics",
           "plot_froc", "plot_pr", "build_report", "EvalOptions"]

log = logging.getLogger(__name__)
METHOD_RE = re.compile(r"^(rpn|rpn\+ffm|rpn\+ffm\+hspl|frst)(\+pruning)?$")


@dataclass(frozen=True)
class Method:
    """One evaluated detection method.

    Attributes:
        name: display name, e.g. ``rpn+ffm+hspl+pruning(swi)`` or ``frst-baseline``.
        source: slug of its raw candidates file (``rpn-ffm-hspl``, ``frst``).
        prune: anatomical pruning applied.
        threshold: operating score threshold.
        final: operating point read from the final ``sub-<id>_cmb.tsv``.
    """

    name: str
    source: str
    prune: bool
    threshold: float
    final: bool


def parse_methods(specs: Sequence[str], variant: str, segmenter_input: str, infer_threshold: float,
                  frst_threshold: float | None = None) -> list[Method]:
    """Methods from config ``evaluate.methods`` (empty: ``variant`` with and without pruning).

    Args:
        specs: entries ``<rpn|rpn+ffm|rpn+ffm+hspl|frst>[+pruning]``.
        variant: the configured detector variant (its operating point is the final cmb.tsv).
        segmenter_input: ``swi`` or ``t1`` (shown in the pruning method name).
        infer_threshold: detector operating threshold (probability), the same for
            every variant (as in the paper's ablation).
        frst_threshold: tuned FRST operating threshold (needed when ``frst`` is listed).
    """
    specs = list(specs) or [variant, f"{variant}+pruning"]
    out = []
    for spec in specs:
        m = METHOD_RE.match(spec)
        if not m:
            raise InputError(f"config key evaluate.methods: {spec!r} is not <rpn|rpn+ffm|rpn+ffm+hspl|frst>[+pruning]")
        base, prune = m.group(1), bool(m.group(2))
        if base == "frst" and frst_threshold is None:
            raise InputError("config key evaluate.methods lists frst but no tuned FRST threshold was given")
        name = ("frst-baseline" if base == "frst" else base) + (f"+pruning({segmenter_input})" if prune else "")
        thr = float(frst_threshold) if base == "frst" else float(infer_threshold)
        out.append(Method(name, base.replace("+", "-"), prune, thr, final=base == variant))
    return out


@dataclass
class SubjectFiles:
    """Expected files of one subject (paths may not exist; ``""`` = not available).

    ``source_dseg``: per detector source (slug), a BOMBS map to prune its raw candidates with instead of
    ``pred_dseg`` (config ``infer.fill_voids``: each detector's map is segmented with the signal voids
    around its own candidates filled); Dice is always that of ``pred_dseg``.
    """

    subject: str
    group: str
    labels: str
    cmb: str
    pred_dseg: str
    mask: str = ""
    true_dseg: str = ""
    candidates: dict[str, str] = field(default_factory=dict)
    swi: str = ""
    source_dseg: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalOptions:
    """Cohort-wide evaluation options.

    Attributes:
        hit_radius_mm: hit radius (mm) of :func:`microbleed.metrics.match_detections`.
        variant: configured detector variant (``rpn+ffm+hspl``...).
        segmenter_input: ``swi`` or ``t1``.
        prune_outside_mask: config ``infer.prune_outside_mask`` (pruning of raw candidates).
        region_radius_mm, none_fraction: config ``infer.region_radius_mm`` and ``infer.none_fraction``
            (see :func:`microbleed.infer.sample_region`).
        allow_missing: config ``evaluate.allow_missing``: a subject with a missing or
            unreadable file is excluded (listed with the reason) instead of failing the cohort.
        dark_fraction: config ``infer.dark_fraction`` (:func:`microbleed.infer.prune`; needs
            each subject's ``swi``).
    """

    hit_radius_mm: float = 5.0
    variant: str = "rpn+ffm+hspl"
    segmenter_input: str = "swi"
    prune_outside_mask: bool = True
    region_radius_mm: float = 0.0
    allow_missing: bool = False
    none_fraction: float = 1.0
    dark_fraction: float = 0.0


def _bool(values: pd.Series) -> np.ndarray:
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]).to_numpy()


def _check_exists(files: SubjectFiles, sources: Sequence[str]) -> None:
    paths = ([files.labels, files.cmb, files.pred_dseg, files.mask, files.true_dseg]
             + [files.candidates[s] for s in sources] + [files.source_dseg[s] for s in sources if s in files.source_dseg])
    missing = [p for p in paths if p and not Path(p).exists()]
    if missing:
        raise InputError(f"missing file(s): {', '.join(missing)}", subject=files.subject)


def _check_labels_inside(labels_ras: np.ndarray, pred: tuple, mask: tuple | None, subject: str, path: str) -> None:
    """CMB labels (RAS mm, ``(N, 3)``) outside the SWI grid of ``pred`` are an input error; outside the
    brain ``mask`` they are kept and logged as a warning (a label at the brain edge is plausible)."""
    if not len(labels_ras):
        return
    ijk = ras_to_voxel(labels_ras, pred[1])
    shape = np.array(pred[0].shape[:3])
    outside = np.any((ijk < -0.5) | (ijk > shape - 0.5), axis=1)
    if outside.any():
        raise InputError(f"{int(outside.sum())} CMB label(s) fall outside the image grid {tuple(shape)} "
                         f"(first at RAS {np.round(labels_ras[outside][0], 1)} mm)", subject=subject, path=path)
    if mask is not None:
        vox = np.clip(np.round(ijk).astype(int), 0, shape - 1)
        off = mask[0][tuple(vox.T)] == 0
        if off.any():
            log.warning("subject %s, file %s: %d CMB label(s) lie outside the brain mask (first at RAS %s mm)",
                        subject, path, int(off.sum()), np.round(labels_ras[off][0], 1))


def _load_subject(files: SubjectFiles, sources: Sequence[str], opts: EvalOptions) -> dict[str, Any]:
    """Read one subject: labels, final findings, raw candidates per source (pruned), Dice."""
    from .infer import dark_voxels, prune
    _check_exists(files, sources)
    sid = files.subject
    lab = read_tsv(files.labels, required=["x", "y", "z"], numeric=["x", "y", "z"], subject=sid)
    lab_regions = [region_name(r) for r in lab["region"]] if "region" in lab.columns else []
    group = files.group or ("cmb" if len(lab) else "normal")
    pred = load_volume(files.pred_dseg, sid, dtype=np.int16, allow_zero=True)
    mask = load_volume(files.mask, sid, dtype=np.uint8) if files.mask else None
    _check_labels_inside(lab[["x", "y", "z"]].to_numpy(float), pred, mask, sid, files.labels)
    cmb = read_tsv(files.cmb, required=["x", "y", "z", "score", "region", "pruned"],
                   numeric=["x", "y", "z", "score"], subject=sid)
    labels = lab[["x", "y", "z"]].to_numpy()
    final = SubjectData(sid, group, labels, cmb[["x", "y", "z"]].to_numpy(), cmb["score"].to_numpy(),
                        lab_regions, [region_name(r) or "none" for r in cmb["region"]], _bool(cmb["pruned"]))
    exclude = None                      # computed once per subject, shared by every detector's candidates
    if opts.dark_fraction > 0 and opts.region_radius_mm > 0:
        if not files.swi:
            raise InputError("infer.dark_fraction > 0 needs the pre-processed SWI", subject=sid, path=files.cmb)
        try:
            exclude = dark_voxels(load_volume(files.swi, sid)[0], mask[0] if mask is not None else None,
                                  opts.dark_fraction)
        except ValueError as err:
            raise InputError(str(err), subject=sid, path=files.swi) from err
    raw = {}
    for src in sources:
        c = read_tsv(files.candidates[src], required=["x", "y", "z", "i", "j", "k", "score"],
                     numeric=["x", "y", "z", "i", "j", "k", "score"], subject=sid)
        bombs = pred
        if src in files.source_dseg:             # segmented with this detector's own candidate voids filled
            bombs = load_volume(files.source_dseg[src], sid, dtype=np.int16, allow_zero=True)
            if bombs[0].shape != pred[0].shape:
                raise InputError(f"BOMBS map {bombs[0].shape} of {src} and {pred[0].shape} of the findings differ "
                                 f"in shape", subject=sid, path=files.source_dseg[src])
        t = prune(c, bombs, mask, -np.inf, opts.prune_outside_mask, opts.region_radius_mm, opts.none_fraction,
                  exclude)
        raw[src] = SubjectData(sid, group, labels, t[["x", "y", "z"]].to_numpy(), t["score"].to_numpy(),
                               lab_regions, list(t["region"]), _bool(t["pruned"]))
    dice = {}
    if files.true_dseg:
        truth, _ = load_volume(files.true_dseg, sid, dtype=np.int16, allow_zero=True)
        if truth.shape != pred[0].shape:
            raise InputError(f"predicted BOMBS map {pred[0].shape} and label map {truth.shape} differ in shape "
                             f"({files.pred_dseg})", subject=sid, path=files.true_dseg)
        dice = dice_per_class(pred[0], truth)
    return {"group": group, "final": final, "raw": raw, "dice": dice}


def _method_tables(loaded: Sequence[dict], methods: Sequence[Method], radius: float
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """detection (method x group), FROC summary (method) and FROC curves (long)."""
    det_rows, froc_rows, curves = [], [], []
    for m in methods:
        raw = [d["raw"][m.source] for d in loaded]
        if m.final:
            op = [d["final"] for d in loaded]
        else:
            op = [s.at_threshold(m.threshold) for s in raw]
        if m.prune:
            op = [s.select(~s.pruned) for s in op]
            raw = [s.select(~s.pruned) for s in raw]
        table = detection_table(op, radius)
        table.insert(0, "method", m.name)
        table["threshold"] = m.threshold
        det_rows.append(table)
        curve = froc_curve(raw, radius)
        froc_rows.append({"method": m.name, **froc_summary(curve), "auc_pr": pr_auc(curve),
                          "n_subjects": len(raw), "n_labels": int(sum(len(s.labels) for s in raw))})
        curves.append(curve.assign(method=m.name))
    det = pd.concat(det_rows, ignore_index=True) if det_rows else pd.DataFrame()
    curve_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    if not curve_df.empty:
        curve_df = curve_df[["method"] + [c for c in curve_df.columns if c != "method"]]
    return det, pd.DataFrame(froc_rows), curve_df


def _localization_table(loaded: Sequence[dict], radius: float) -> pd.DataFrame:
    """Table 2: Dice (mean, sd over subjects), LA per class and total, EFP_avg in the total row."""
    finals = [d["final"] for d in loaded]
    la = localization_accuracy(finals, radius).set_index("region")
    dice = pd.DataFrame([d["dice"] for d in loaded if d["dice"]])
    rows = []
    for region in (*REGIONS, "none", "total"):
        col = dice[region] if region in dice.columns else pd.Series(dtype=float)
        row = {"region": region, "dice_mean": col.mean(), "dice_sd": col.std(ddof=1),
               "n_dice_subjects": int(col.notna().sum())}
        if region in la.index:
            row.update(la.loc[region].to_dict())
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in ("n_labels", "n_detected", "n_correct"):      # counts, not floats ("19", not "19.0")
        if col in table.columns:
            table[col] = table[col].astype("Int64")
    table["efp_avg"] = np.nan
    table.loc[table["region"] == "total", "efp_avg"] = eliminated_fp(finals, radius)["efp_avg"]
    return table


def _framework_table(loaded: Sequence[dict], radius: float, variant: str, segmenter_input: str) -> pd.DataFrame:
    """Table 3: the configured detector alone and with pruning, per group, with the pruned FP/TP counts."""
    finals = [d["final"] for d in loaded]
    rows = []
    for task, pruned in (("detection", False), (f"detection+pruning({segmenter_input})", True)):
        subs = [s.select(~s.pruned) for s in finals] if pruned else finals
        t = detection_table(subs, radius).set_index("group")
        row = {"task": task, "variant": variant}
        for g in ("cmb", "normal", "all"):
            row.update({f"{k}_{g}": t.loc[g, k] for k in ("sensitivity", "precision", "fp_avg", "tp", "fp", "fn")})
            e = eliminated_fp([s for s in finals if g == "all" or s.group == g], radius)
            row.update({f"efp_{g}": e["efp"] if pruned else 0, f"etp_{g}": e["etp"] if pruned else 0,
                        f"efp_avg_{g}": e["efp_avg"] if pruned else 0.0})
        rows.append(row)
    return pd.DataFrame(rows)


def _subject_rows(files: Sequence[SubjectFiles], loaded: Mapping[str, dict], excluded: Mapping[str, str],
                  radius: float) -> pd.DataFrame:
    """Per-subject status, operating-point counts, predicted (kept) and labelled counts per region."""
    rows = []
    for f in files:
        row: dict[str, Any] = {"subject": f.subject, "group": f.group, "status": "included", "reason": ""}
        if f.subject in excluded:
            row.update(status="excluded", reason=excluded[f.subject])
        else:
            s = loaded[f.subject]["final"]
            kept = s.select(~s.pruned)
            t = detection_table([kept], radius).set_index("group").loc["all"]
            row.update(group=s.group, tp=int(t["tp"]), fp=int(t["fp"]), fn=int(t["fn"]))
            row.update({f"pred_{k}": v for k, v in bombs_region_tally(kept.det_regions).items()})
            if all(r for r in s.label_regions):
                row.update({f"true_{k}": v for k, v in bombs_region_tally(s.label_regions).items()})
            else:                                             # a label without a region: per-region
                row.update({f"true_{k}": np.nan for k in REGIONS})   # counts unknown, not zero
            row["true_total"] = len(s.labels)                 # also when label regions are unknown
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:                                    # counts stay integers beside excluded rows
        if col in ("tp", "fp", "fn") or col.startswith(("pred_", "true_")):
            df[col] = df[col].astype("Int64")
    return df


def evaluate_cohort(files: Sequence[SubjectFiles], methods: Sequence[Method], opts: EvalOptions
                    ) -> dict[str, pd.DataFrame]:
    """All metric tables of one cohort.

    Returns:
        ``{"detection", "froc", "froc_curve", "localization", "framework",
        "subjects", "agreement"}`` DataFrames (fractions, FP per subject).
        With ``opts.allow_missing``, excluded subjects (missing or unreadable
        files) appear in ``subjects`` with ``status = excluded`` and the reason,
        and in every detection row (``n_excluded``, ``excluded``).

    Raises:
        InputError or OSError: a missing or unreadable file, unless ``opts.allow_missing``.
        Any other exception (e.g. a plain ``ValueError``) always propagates.
    """
    sources = sorted({m.source for m in methods})
    loaded, excluded = {}, {}
    for f in files:
        try:
            loaded[f.subject] = _load_subject(f, sources, opts)
        except (InputError, OSError) as exc:          # bad or missing file; anything else is a bug
            if not opts.allow_missing:
                raise
            log.warning("excluded: %s", exc)
            excluded[f.subject] = str(exc)
    ok = [loaded[f.subject] for f in files if f.subject in loaded]
    hit_radius_mm = opts.hit_radius_mm
    det, froc, curves = _method_tables(ok, methods, hit_radius_mm)
    note = "; ".join(excluded.values())                 # each message names subject and file
    if not det.empty:
        det["n_excluded"] = len(excluded)
        det["excluded"] = note
    subjects = _subject_rows(files, loaded, excluded, hit_radius_mm)
    inc = subjects[subjects["status"] == "included"].set_index("subject")
    pred_cols = {f"pred_{r}": r for r in (*REGIONS, "total")}
    true_cols = {f"true_{r}": r for r in (*REGIONS, "total")}
    agreement = (count_agreement(inc[list(pred_cols)].rename(columns=pred_cols),
                                 inc[list(true_cols)].rename(columns=true_cols))
                 if not inc.empty else pd.DataFrame())
    return {"detection": det, "froc": froc, "froc_curve": curves,
            "localization": _localization_table(ok, hit_radius_mm),
            "framework": _framework_table(ok, hit_radius_mm, opts.variant, opts.segmenter_input),
            "subjects": subjects, "agreement": agreement}


def write_metrics(tables: Mapping[str, pd.DataFrame], paths: Mapping[str, str]) -> None:
    """Write each table whose name is in ``paths`` as TSV (atomic), fractions with 4 decimals."""
    for name, path in paths.items():
        write_tsv(tables[name], path)


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _method_style(names) -> dict[str, dict]:
    """Line style per method: one colour per detector, dashed for its ``+pruning(...)`` rows, so
    that a pruned curve lying on the unpruned one stays visible."""
    bases = list(dict.fromkeys(str(n).split("+pruning")[0] for n in names))
    colours = {b: f"C{i % 10}" for i, b in enumerate(bases)}
    return {n: {"color": colours[str(n).split("+pruning")[0]],
                "ls": "--" if "+pruning" in str(n) else "-", "lw": 1.3 if "+pruning" in str(n) else 1.8}
            for n in names}


def plot_froc(curves: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """FROC plot: sensitivity vs FP_avg (log x, 1/8..8 marked) per method, PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    lo, hi = FROC_FP_POINTS[0] / 2, FROC_FP_POINTS[-1] * 2
    style = _method_style(curves["method"].unique() if not curves.empty else [])
    for name, c in (curves.groupby("method", sort=False) if not curves.empty else []):
        x = np.clip(c["fp_avg"].to_numpy(float), lo, hi)        # FP_avg 0 drawn at the left edge
        y = np.nan_to_num(c["sensitivity"].to_numpy(float))
        ax.plot(np.append(x, hi), np.append(y, y[-1]), drawstyle="steps-post", label=name, **style[name])
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xticks(FROC_FP_POINTS, [f"{p:g}" for p in FROC_FP_POINTS])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per subject (FP_avg)")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or "FROC")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside: curves stay visible
    return _save(fig, path)


def plot_pr(curves: pd.DataFrame, froc: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Precision-recall plot per method (AUC-PR in the legend), PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    auc = dict(zip(froc.get("method", []), froc.get("auc_pr", [])))
    style = _method_style(curves["method"].unique() if not curves.empty else [])
    for name, c in (curves.groupby("method", sort=False) if not curves.empty else []):
        c = c[c["n_detections"] > 0]
        ax.step(c["sensitivity"], c["precision"], where="post", label=f"{name} (AUC {auc.get(name, np.nan):.2f})",
                **style[name])
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title(title or "Precision-recall")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_counts(subjects: pd.DataFrame, agreement: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Predicted (kept after pruning) against labelled CMB counts per subject, one panel per BOMBS
    region and the total, with the identity line and Pearson r / mean absolute error of
    :func:`microbleed.metrics.count_agreement`; PNG. Points are jittered slightly so that subjects
    with equal counts stay visible; subjects without a known count are left out of that panel."""
    plt = _figure()
    regions = (*REGIONS, "total")
    fig, axes = plt.subplots(1, len(regions), figsize=(3.0 * len(regions), 3.2), dpi=100)
    inc = subjects[subjects["status"] == "included"] if "status" in subjects else subjects
    agr = agreement.set_index("region") if not agreement.empty and "region" in agreement else pd.DataFrame()
    rng = np.random.default_rng(0)
    for ax, region in zip(axes, regions):
        t = float_values(inc.get(f"true_{region}", pd.Series(dtype=float)))
        p = float_values(inc.get(f"pred_{region}", pd.Series(dtype=float)))
        known = np.isfinite(t) & np.isfinite(p)
        t, p = t[known], p[known]
        top = max(1.0, float(np.max(t, initial=0)), float(np.max(p, initial=0))) + 0.5
        ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--")
        if len(t):
            groups = inc["group"].to_numpy()[known] if "group" in inc else np.array(["cmb"] * len(t))
            jitter = rng.uniform(-0.12, 0.12, size=(2, len(t)))
            for group, colour in (("cmb", "tab:red"), ("normal", "tab:blue")):
                sel = groups == group
                if sel.any():
                    ax.scatter(t[sel] + jitter[0, sel], p[sel] + jitter[1, sel], s=14, alpha=0.7, color=colour,
                               label=group)
        r = agr.loc[region, "pearson_r"] if region in agr.index else np.nan
        mae = agr.loc[region, "mean_abs_error"] if region in agr.index else np.nan
        ax.set_title(f"{region}\nr = {r:.2f}, MAE = {mae:.2f} (n = {len(t)})", fontsize=9)
        ax.set_xlim(-0.5, top)
        ax.set_ylim(-0.5, top)
        ax.set_xlabel("labelled CMBs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("detected CMBs (after pruning)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "Per-subject CMB counts", fontsize=10, y=1.06)   # above the two-line panel titles
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from .io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _figure().close(fig)
    return Path(path)


# --------------------------------------------------------------------------- HTML
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right}th{background:#f3f3f3}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
img{max-width:100%}.figs img{width:48%;margin-right:1%}.note{color:#666;font-size:.9em}
details{margin:.4em 0}"""


def _img(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame | None) -> str:
    if df is None or df.empty:
        return '<p class="note">(no rows)</p>'
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="n/a", border=0)


def _read(path: str | Path) -> pd.DataFrame | None:
    p = Path(path)
    # subject ids are text ("001" stays "001")
    return pd.read_csv(p, sep="\t", dtype={"subject": str}) if p.exists() and p.stat().st_size else None


def _montages(cohort_dir: Path, subjects: Sequence[str], limit: int) -> str:
    parts, n = [], 0
    for sid in subjects:
        pngs = sorted((cohort_dir / f"sub-{sid}" / "qc").glob("*.png"))
        if not pngs:
            continue
        imgs = []
        for p in pngs:
            if n >= limit:
                break
            imgs.append(f"<figure>{_img(p, p.name)}<figcaption>{html.escape(p.name)}</figcaption></figure>")
            n += 1
        parts.append(f"<details><summary>sub-{html.escape(sid)} ({len(pngs)} images)</summary>{''.join(imgs)}</details>")
    if not parts:
        return '<p class="note">No montage found (results/&lt;cohort&gt;/sub-&lt;id&gt;/qc/*.png).</p>'
    if n >= limit:
        parts.append(f'<p class="note">Only the first {limit} images are shown.</p>')
    return "".join(parts)


def _threshold_note(path: str | Path | None) -> str:
    """One line on the cohort's operating threshold (its ``detector_threshold.json``), or nothing."""
    if not path:
        return ""
    rec = json.loads(Path(path).read_text())
    text = (f"Operating threshold {rec['threshold']:.4f} (validation threshold {rec['validation_threshold']:.4f}; "
            f"infer.adapt_threshold {rec['mode']}: {rec['reason']}")
    if rec.get("adapted"):
        text += f"; map logit(cohort) = {rec['slope']:.3f} logit(validation) {rec['intercept']:+.3f}"
    return f'<p class="note">{html.escape(text + ").")}</p>'


def build_report(cohort: str, metrics: Mapping[str, str], cohort_dir: str | Path, subjects: Sequence[str],
                 config: Mapping[str, Any], cards: Mapping[str, str], out_html: str | Path,
                 max_images: int = 300, threshold: str | Path | None = None) -> Path:
    """Write ``report.html``: one self-contained file (inline CSS, base64 PNGs, no external link).

    Args:
        metrics: name -> path of the metric files (``detection``, ``framework``,
            ``localization``, ``froc``, ``agreement``, ``subjects``: TSV;
            ``froc_png``, ``pr_png``, ``counts_png``: PNG; ``counts_png`` optional).
        cohort_dir: ``results/<cohort>``, searched for ``sub-<id>/qc/*.png`` montages.
        config: the run's config (dumped as YAML).
        cards: model name -> path of a ``card.json`` (or ``params.json``); missing files are noted.
        threshold: the cohort's ``detector_threshold.json`` (rule ``cohort_threshold``): the
            operating threshold applied, stated under the detection table.
    """
    t = {k: _read(v) for k, v in metrics.items() if str(v).endswith(".tsv")}
    figs = "".join(_img(metrics[k], k) for k in ("froc_png", "pr_png") if k in metrics and Path(metrics[k]).exists())
    counts_fig = _img(metrics["counts_png"], "counts_png") if Path(metrics.get("counts_png", "")).is_file() else ""
    card_html = []
    for name, path in cards.items():
        body = (json.dumps(json.loads(Path(path).read_text()), indent=2) if Path(path).exists()
                else f"(missing: {path})")
        card_html.append(f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(body)}</pre></details>")
    sections = [
        ("Detection (paper Table 1)", _table(t.get("detection"))
         + '<p class="note">Fractions (0-1); FP_avg = false positives per subject; hit = one-to-one match within '
           f'{html.escape(str(config.get("evaluate", {}).get("hit_radius_mm", "")))} mm.</p>'
         + _threshold_note(threshold)),
        ("Whole framework (paper Table 3)", _table(t.get("framework"))),
        ("Anatomical localisation (paper Table 2)", _table(t.get("localization"))),
        ("FROC and precision-recall", f'<div class="figs">{figs}</div>' + _table(t.get("froc"))),
        ("Count agreement per region", counts_fig + _table(t.get("agreement"))),
        ("Per-subject counts", _table(t.get("subjects"))),
        ("Detections (montages)", _montages(Path(cohort_dir), subjects, max_images)),
        ("Model cards", "".join(card_html) or '<p class="note">none</p>'),
        ("Configuration", f"<pre>{html.escape(yaml.safe_dump(_plain(config), sort_keys=False))}</pre>"),
    ]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = "".join(f"<h2>{html.escape(h)}</h2>{c}" for h, c in sections)
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CMB report: {html.escape(cohort)}'
           f"</title><style>{CSS}</style></head><body><h1>Cerebral microbleeds: cohort {html.escape(cohort)}</h1>"
           f'<p class="note">Generated {now}; {len(subjects)} subjects.</p>{body}</body></html>')
    from .io import atomic_path
    with atomic_path(out_html) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return Path(out_html)


def _plain(obj: Any) -> Any:
    """Config (possibly Snakemake's mapping types) as plain dicts/lists for YAML."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
