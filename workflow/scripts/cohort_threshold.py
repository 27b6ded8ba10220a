"""Rule `cohort_threshold`: background scores of a cohort + detector card -> the cohort's operating threshold (JSON)."""

import json
import logging
import math
from typing import Any, Mapping, Sequence

from microbleed.io import atomic_path, read_tsv
from microbleed.train import cohort_threshold


def main(background: Sequence[str], card: str, out_json: str, *, infer: Mapping[str, Any],
         cohort: str | None = None, left_out: Sequence[str] = ()) -> dict[str, Any]:
    """Read each subject's background scores, run :func:`microbleed.train.cohort_threshold`, write its
    record (with the subjects ``left_out``: their detection failed in an earlier run)."""
    if left_out:
        logging.warning("cohort %s: subject(s) %s left out of the cohort threshold (their detection failed "
                        "in an earlier run: no background scores)", cohort, ", ".join(left_out))
    scores = [read_tsv(path, required=["score"], numeric=["score"])["score"].to_numpy(float) for path in background]
    record = {**cohort_threshold(infer, card, scores, cohort), "left_out": list(left_out)}
    logging.info("cohort %s: operating threshold %.4f (validation %.4f, mode %s: %s)", cohort, record["threshold"],
                 record["validation_threshold"], record["mode"], record["reason"])
    plain = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with atomic_path(out_json) as tmp:                      # strict JSON: NaN (an unfitted map, a level
        tmp.write_text(json.dumps(plain, indent=2, allow_nan=False) + "\n")   # not reached) as null
    return record


if "snakemake" in globals():
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    smk = snakemake  # noqa: F821
    main(list(smk.input.background), smk.input.card, smk.output.threshold, infer=dict(smk.params.infer),
         cohort=smk.wildcards.cohort, left_out=list(smk.params.left_out))
