"""Cohort tables: simulated, BIDS and subjects-table cohorts, id validation."""
import pandas as pd
import pytest

from microbleed.cohort import cohort_table, simulated_subjects
from microbleed.io import InputError


def test_simulated_ids_and_groups():
    assert simulated_subjects({"subjects": 3, "normal": 1}) == [("001", "cmb"), ("002", "cmb"), ("003", "normal")]
    with pytest.raises(InputError, match="exceeds"):
        simulated_subjects({"subjects": 2, "normal": 3})


def test_simulated_table_paths():
    df = cohort_table("sim", {"simulate": {"seed": 1, "subjects": 2, "normal": 0, "acquisition": "demo"}}, "res")
    assert df.loc[0, "swi"] == "res/cohorts/sim/sub-001/anat/sub-001_swi.nii.gz"
    assert df.loc[1, "cmb"].endswith("derivatives/cmb/sub-002/sub-002_cmb.tsv")


def _bids(tmp_path, ids, participants=True):
    for s in ids:
        (tmp_path / f"sub-{s}" / "anat").mkdir(parents=True, exist_ok=True)
    if participants:
        pd.DataFrame({"participant_id": [f"sub-{s}" for s in ids], "group": ["cmb"] * len(ids)}).to_csv(
            tmp_path / "participants.tsv", sep="\t", index=False)


def test_bids_table_optional_files(tmp_path):
    _bids(tmp_path, ["01", "02"])
    t1 = tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    t1.write_bytes(b"x")
    df = cohort_table("b", {"bids": str(tmp_path)})
    assert list(df["subject"]) == ["01", "02"]
    assert df.loc[0, "t1"] == "" and df.loc[1, "t1"] == str(t1)


def test_bids_free_group_values_fall_back_to_the_labels(tmp_path, caplog):
    """BIDS `group` is free text (patient/control, n/a): only cmb|normal are taken; others become ""
    (the group is then read from the labels), with a warning, instead of a group no table row holds."""
    _bids(tmp_path, ["01", "02", "03"])
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "group": ["patient", "n/a", " Normal"]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)
    with caplog.at_level("WARNING", logger="microbleed.cohort"):
        df = cohort_table("b", {"bids": str(tmp_path)})
    assert list(df["group"]) == ["", "", "normal"]
    assert "n/a" in caplog.text and "patient" in caplog.text and "01, 02" in caplog.text


@pytest.mark.parametrize("bad", ["../etc", "a_b", "x y", ""])
def test_bad_subject_ids_are_refused(tmp_path, bad):
    table = tmp_path / "subjects.tsv"
    table.write_text(f"subject\tswi\tphase\n{bad}\ta.nii.gz\tb.nii.gz\n")
    with pytest.raises(InputError, match="is not \\[A-Za-z0-9\\]\\+"):
        cohort_table("t", {"subjects": str(table)})


def test_duplicate_and_empty_cohorts(tmp_path):
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\nA1\ta\tb\nA1\tc\td\n")
    with pytest.raises(InputError, match="more than once.*A1"):
        cohort_table("t", {"subjects": str(table)})
    table.write_text("subject\tswi\tphase\n")
    with pytest.raises(InputError, match="no subjects"):
        cohort_table("t", {"subjects": str(table)})


def test_subjects_table_relative_paths(tmp_path):
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\tgroup\nA1\tswi/a.nii.gz\t/abs/p.nii.gz\tnormal\n")
    df = cohort_table("t", {"subjects": str(table)})
    assert df.loc[0, "swi"] == str(tmp_path / "swi/a.nii.gz")
    assert df.loc[0, "phase"] == "/abs/p.nii.gz"
    assert df.loc[0, "group"] == "normal"


def test_missing_inputs_are_all_named_at_once_or_skipped(tmp_path, caplog):
    from microbleed.cohort import drop_missing
    for sid in ("A1", "A2", "A3"):
        for kind in ("swi", "phase"):
            (tmp_path / f"{sid}_{kind}.nii.gz").write_bytes(b"x")
    (tmp_path / "A2_phase.nii.gz").unlink()
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\tt1\tgroup\n"
                     "A1\tA1_swi.nii.gz\tA1_phase.nii.gz\t\tCMB \n"
                     "A2\tA2_swi.nii.gz\tA2_phase.nii.gz\t\t\n"
                     "A3\tA3_swi.nii.gz\tA3_phase.nii.gz\tno_t1.nii.gz\t\n")
    df = cohort_table("t", {"subjects": str(table)})
    assert df.loc[0, "group"] == "cmb"                                   # trimmed, lower-cased
    with pytest.raises(InputError, match="2 input file.*sub-A2 phase: .*A2_phase.*sub-A3 t1: .*no_t1.*skip_missing"):
        drop_missing(df, "t", skip=False)
    with caplog.at_level("WARNING", logger="microbleed.cohort"):
        kept = drop_missing(df, "t", skip=True)
    assert list(kept["subject"]) == ["A1"] and "A2" in caplog.text
    with pytest.raises(InputError, match="every subject"):
        drop_missing(df[df["subject"] != "A1"], "t", skip=True)


def test_where_keeps_one_site_of_a_bids_folder(tmp_path):
    """`where` over participants.tsv: one cohort per scanner of a multi-site folder; a list matches
    any of its values, numbers match their text, an absent column or an empty selection is named."""
    for s in ("01", "02", "03", "04"):
        (tmp_path / f"sub-{s}" / "anat").mkdir(parents=True)
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                  "site": ["A", "B", " A", "C"], "field": ["3", "1.5", "3.0", "3"]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)
    assert list(cohort_table("a", {"bids": str(tmp_path), "where": {"site": "A"}})["subject"]) == ["01", "03"]
    assert list(cohort_table("bc", {"bids": str(tmp_path), "where": {"site": ["B", "C"]}})["subject"]) == ["02", "04"]
    assert list(cohort_table("a3", {"bids": str(tmp_path), "where": {"site": "A", "field": 3}})["subject"]) \
        == ["01", "03"]
    assert list(cohort_table("f", {"bids": str(tmp_path), "where": {"field": 1.5}})["subject"]) == ["02"]
    with pytest.raises(InputError, match=r"participants.tsv.*cohort 'x'.*column 'scanner'"):
        cohort_table("x", {"bids": str(tmp_path), "where": {"scanner": "A"}})
    with pytest.raises(InputError, match=r"cohort 'y'.*no subject matches.*'A', 'B', 'C'"):
        cohort_table("y", {"bids": str(tmp_path), "where": {"site": "D"}})
    (tmp_path / "participants.tsv").unlink()
    with pytest.raises(InputError, match="participants.tsv"):
        cohort_table("z", {"bids": str(tmp_path), "where": {"site": "A"}})


def test_where_on_a_subjects_table_and_not_on_a_simulated_cohort(tmp_path):
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\tscanner\nA1\ta.nii.gz\tp.nii.gz\tprisma\n"
                     "A2\tb.nii.gz\tq.nii.gz\taera\n")
    df = cohort_table("t", {"subjects": str(table), "where": {"scanner": "aera"}})
    assert list(df["subject"]) == ["A2"] and df.loc[0, "swi"] == str(tmp_path / "b.nii.gz")
    with pytest.raises(InputError, match="simulated"):
        cohort_table("s", {"simulate": {"seed": 1, "subjects": 2, "normal": 0, "acquisition": "demo"},
                           "where": {"site": "A"}}, "res")


def test_bids_uncompressed_nii_and_sessions(tmp_path):
    """Valid BIDS that is common in practice: `.nii` files, and `ses-*` folders (one cohort per
    session with `session`; without it a subject with sessions only is refused with the fix named)."""
    from microbleed.cohort import drop_missing
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for kind in ("swi", "part-phase_swi"):
        (anat / f"sub-01_{kind}.nii").write_bytes(b"x")
    df = drop_missing(cohort_table("n", {"bids": str(tmp_path)}), "n", skip=False)
    assert df.loc[0, "swi"] == str(anat / "sub-01_swi.nii") and df.loc[0, "phase"].endswith("phase_swi.nii")

    for ses in ("base", "fu"):
        anat = tmp_path / "sub-02" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        for kind in ("swi", "part-phase_swi"):
            (anat / f"sub-02_ses-{ses}_{kind}.nii.gz").write_bytes(b"x")
    cmb = tmp_path / "derivatives" / "cmb" / "sub-02" / "ses-fu" / "sub-02_ses-fu_cmb.tsv"
    cmb.parent.mkdir(parents=True)
    cmb.write_text("x\ty\tz\n")
    aseg = tmp_path / "derivatives" / "freesurfer" / "sub-02_ses-fu" / "mri" / "aseg.mgz"
    aseg.parent.mkdir(parents=True)
    aseg.write_bytes(b"x")
    with pytest.raises(InputError, match=r"sub-02 has sessions \['base', 'fu'\].*cohorts.s.session"):
        cohort_table("s", {"bids": str(tmp_path)})
    fu = cohort_table("fu", {"bids": str(tmp_path), "session": "fu"}).set_index("subject")
    assert fu.loc["02", "swi"] == str(tmp_path / "sub-02" / "ses-fu" / "anat" / "sub-02_ses-fu_swi.nii.gz")
    assert fu.loc["02", "cmb"] == str(cmb) and fu.loc["02", "aseg"] == str(aseg)
    assert cohort_table("b", {"bids": str(tmp_path), "session": "base"}).set_index("subject").loc["02", "cmb"] == ""
    with pytest.raises(InputError, match="1 input file|2 input file"):      # sub-01 has no session fu
        drop_missing(cohort_table("fu", {"bids": str(tmp_path), "session": "fu"}), "fu", skip=False)
    with pytest.raises(InputError, match="session '../x'"):
        cohort_table("x", {"bids": str(tmp_path), "session": "../x"})


def test_where_is_applied_before_the_left_out_subjects_are_checked(tmp_path):
    """A subject `where` leaves out is not read: its sessions-only folder or bad id stop nothing."""
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "sub-02" / "ses-a" / "anat").mkdir(parents=True)
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-0_3"], "site": ["A", "B", "B"]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)
    assert list(cohort_table("a", {"bids": str(tmp_path), "where": {"site": "A"}})["subject"]) == ["01"]
    with pytest.raises(InputError, match="sub-02 has sessions"):            # the ones it keeps are checked
        cohort_table("b", {"bids": str(tmp_path), "where": {"site": "B"}})
    table = tmp_path / "subjects.tsv"
    table.write_text("subject\tswi\tphase\tsite\nA1\ta.nii.gz\tp.nii.gz\tA\nB_1\tb.nii.gz\tq.nii.gz\tB\n")
    assert list(cohort_table("t", {"subjects": str(table), "where": {"site": "A"}})["subject"]) == ["A1"]
    with pytest.raises(InputError, match="session selects a session of a bids cohort only"):
        cohort_table("t", {"subjects": str(table), "session": "fu"})


def test_expected_file_names_where_a_missing_file_was_looked_for(tmp_path):
    from microbleed.cohort import expected_file
    assert expected_file("b", {"bids": str(tmp_path)}, "01", "cmb") == \
        str(tmp_path / "derivatives" / "cmb" / "sub-01" / "sub-01_cmb.tsv")
    ses = expected_file("b", {"bids": str(tmp_path), "session": "fu"}, "01", "t1")
    assert "ses-fu" in ses and ses.endswith("_T1w.nii.gz")
    assert expected_file("b", {"bids": str(tmp_path)}, "01", "aseg").count("sub-01") >= 2
    assert expected_file("t", {"subjects": "s.tsv"}, "01", "cmb") == "column 'cmb' of the subjects table s.tsv"


def test_a_bad_folder_id_without_participants_names_the_folder(tmp_path):
    (tmp_path / "sub-P.01" / "anat").mkdir(parents=True)
    with pytest.raises(InputError, match="is not") as exc:
        cohort_table("d", {"bids": str(tmp_path)})
    assert "sub-P.01" in str(exc.value) and "participants.tsv" not in str(exc.value)


def test_training_subjects_are_found_in_an_evaluated_cohort_by_file_or_simulation(tmp_path):
    """The same SWI file under another cohort name (a `where` overlap, a copy of the config entry)
    or the same simulation seed (whatever the cohort's size or acquisition) are training subjects;
    another seed or other files are not."""
    from microbleed.cohort import shared_with_training
    for s in ("A1", "A2", "B1"):
        anat = tmp_path / "bids" / f"sub-{s}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{s}_swi.nii.gz").write_bytes(b"x")
        (anat / f"sub-{s}_part-phase_swi.nii.gz").write_bytes(b"x")
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tsite\nsub-A1\ta\nsub-A2\ta\nsub-B1\tb\n")
    sim = {"seed": 1, "subjects": 3, "normal": 1, "acquisition": "demo"}
    entries = {"train": {"bids": str(tmp_path / "bids"), "where": {"site": "a"}},
               "site-b": {"bids": str(tmp_path / "bids"), "where": {"site": "b"}},
               "everyone": {"bids": str(tmp_path / "bids") + "/."},
               "sim-train": {"simulate": sim}, "sim-copy": {"simulate": dict(sim)},
               "sim-other": {"simulate": {**sim, "seed": 2}},
               "sim-fewer": {"simulate": {**sim, "subjects": 2, "normal": 0, "acquisition": "other"}}}
    tables = {n: cohort_table(n, e, tmp_path / "results") for n, e in entries.items()}
    assert shared_with_training(tables, entries, "train", ["site-b", "everyone"]) == {"everyone": ["A1", "A2"]}
    assert shared_with_training(tables, entries, "sim-train", ["sim-copy", "sim-other", "sim-fewer"]) == {
        "sim-copy": ["001", "002", "003"], "sim-fewer": ["001", "002"]}     # same seeds: the same heads


def test_bids_file_names_with_more_entities(tmp_path, caplog):
    """Real BIDS names carry acq/rec/run/echo entities, or a `part-mag` SWI: used where the plain names
    are absent, the phase of the same entities as the SWI; two SWI images of one subject are refused
    naming both (the user chooses); two T1w leave the subject without T1, with a warning."""
    import logging
    from microbleed.cohort import drop_missing
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_acq-3d_run-1_swi.nii.gz", "sub-01_acq-3d_run-1_part-phase_swi.nii.gz",
                 "sub-01_acq-3d_run-1_part-phase_swi.json", "sub-01_acq-other_part-phase_swi.nii.gz",
                 "sub-01_acq-mprage_T1w.nii"):
        (anat / name).write_bytes(b"x")
    df = drop_missing(cohort_table("e", {"bids": str(tmp_path)}), "e", skip=False)
    assert df.loc[0, "swi"] == str(anat / "sub-01_acq-3d_run-1_swi.nii.gz")
    assert df.loc[0, "phase"] == str(anat / "sub-01_acq-3d_run-1_part-phase_swi.nii.gz")
    assert df.loc[0, "t1"] == str(anat / "sub-01_acq-mprage_T1w.nii")

    mag = tmp_path / "sub-02" / "anat"
    mag.mkdir(parents=True)
    for name in ("sub-02_part-mag_swi.nii.gz", "sub-02_part-phase_swi.nii.gz", "sub-02_run-1_T1w.nii.gz",
                 "sub-02_run-2_T1w.nii.gz"):
        (mag / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="microbleed.cohort"):
        row = cohort_table("e", {"bids": str(tmp_path)}).set_index("subject").loc["02"]
    assert row["swi"].endswith("sub-02_part-mag_swi.nii.gz") and row["phase"].endswith("sub-02_part-phase_swi.nii.gz")
    assert row["t1"] == "" and "2 T1w images" in caplog.text

    lo = tmp_path / "sub-03" / "anat"          # an SWI of other entities never takes the plain phase
    lo.mkdir(parents=True)
    for name in ("sub-03_acq-lo_swi.nii.gz", "sub-03_part-phase_swi.nii.gz"):
        (lo / name).write_bytes(b"x")
    with pytest.raises(InputError, match=r"sub-03 phase: .*sub-03_acq-lo_part-phase_swi.nii.gz"):
        drop_missing(cohort_table("e", {"bids": str(tmp_path)}), "e", skip=False)
    (lo / "sub-03_acq-lo_swi.nii.gz").unlink()

    (anat / "sub-01_acq-3d_run-2_swi.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"sub-01 has 2 SWI images \(sub-01_acq-3d_run-1_swi.nii.gz, "
                                         r"sub-01_acq-3d_run-2_swi.nii.gz\).*subjects table"):
        cohort_table("e", {"bids": str(tmp_path)})
    (anat / "sub-01_swi.nii.gz").write_bytes(b"x")      # the plain name wins, as before
    assert cohort_table("e", {"bids": str(tmp_path)}).loc[0, "swi"] == str(anat / "sub-01_swi.nii.gz")
