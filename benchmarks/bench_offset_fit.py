"""Time of the segmenter's class-offset fit (:func:`microbleed.segment._fit_offsets`, run at every
whole-volume check and once at the end of training) against the plain search it replaced, one full
arg-max of the ``(4, M)`` log-probabilities per offset tried, on ``M`` synthetic movable voxels with a
prior on ``deep`` to undo. Both must choose the same offsets (checked here and in
``tests/test_segmenter.py``).

Run: ``PYTHONPATH=workflow .venv/bin/python benchmarks/bench_offset_fit.py --voxels 6700000``
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from microbleed import segment


def fit_offsets_by_argmax(fixed, logp, truth, grid, rounds=2):
    """The coordinate ascent spelt out: one full arg-max per offset tried (the reference)."""
    grid = sorted((float(v) for v in grid), key=abs)

    def score(off):
        return segment._confusion_dice(fixed + segment._confusion(truth, (logp + off[:, None]).argmax(0)))["total"]
    offsets = np.zeros(segment.N_CLASSES, dtype=np.float32)
    best = score(offsets)
    for _ in range(rounds):
        for c in range(1, segment.N_CLASSES):
            for v in grid:
                trial = offsets.copy()
                trial[c] = v
                value = score(trial)
                if value > best + 1e-12:
                    best, offsets = value, trial
    return offsets


def synthetic(voxels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, voxels)
    logits = rng.normal(0, 1, (4, voxels)).astype(np.float32)
    logits[labels, np.arange(voxels)] += 1.0
    logits[2] += 1.0
    prob = np.exp(logits - logits.max(0))
    prob /= prob.sum(0)
    return segment._split_movable(segment._log_probabilities(prob), labels, segment.OFFSET_GRID)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voxels", type=int, default=2_000_000)
    a = ap.parse_args(argv)
    fixed, logp, truth = synthetic(a.voxels)
    t = time.perf_counter()
    fast = segment._fit_offsets(fixed, logp, truth, segment.OFFSET_GRID)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = fit_offsets_by_argmax(fixed, logp, truth, segment.OFFSET_GRID)
    t_ref = time.perf_counter() - t
    out = {"machine": f"{platform.node()} ({platform.machine()})", "movable_voxels": int(truth.size),
           "sorted_margins_s": round(t_fast, 1), "argmax_search_s": round(t_ref, 1),
           "same_offsets": bool(np.array_equal(fast, ref)), "offsets": fast.tolist()}
    print(out)
    return out


if __name__ == "__main__":
    main()
