"""Reliability and security: atomic writes, safe model loading, no shell, no path escape."""
from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from microbleed.cohort import check_subject_id, cohort_table
from microbleed.io import InputError, read_tsv, save_image, write_tsv
from microbleed.runtime import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "workflow" / "microbleed").rglob("*.py")) + sorted((ROOT / "workflow" / "scripts").glob("*.py"))

#: Writers that call a file-writing function outside ``with atomic_path(...)``, and why that is safe.
ALLOWED_DIRECT_WRITES = {
    ("runtime.py", "CsvLog.__init__"): "header of the append-only training log (rewritten atomically on resume)",
    ("runtime.py", "CsvLog.write"): "append-only training log: one row per epoch, truncate_after rewrites it "
                                    "atomically on resume",
}
_WRITER_ATTRS = {"savefig", "to_csv", "write_text", "write_bytes", "to_filename", "to_parquet", "to_json"}
_WRITER_FUNCS = {("nib", "save"), ("nibabel", "save"), ("torch", "save"), ("np", "save"), ("np", "savez"),
                 ("json", "dump"), ("shutil", "copy"), ("shutil", "copyfile"), ("shutil", "move")}


def _is_writer(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        if f.attr in _WRITER_ATTRS:
            return True
        if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in _WRITER_FUNCS:
            return True
    if isinstance(f, ast.Name) and f.id == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax"))
    return False


def _is_atomic_with(node: ast.AST) -> bool:
    return isinstance(node, ast.With) and any(
        isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "atomic_path"
        for i in node.items)


def _direct_writes(path: Path) -> list[tuple[str, str, int]]:
    """``(file, qualified function, line)`` of every writer call not inside ``with atomic_path(...)``."""
    found = []

    def visit(node, scope, atomic):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}" if scope else node.name
        atomic = atomic or _is_atomic_with(node)
        if isinstance(node, ast.Call) and _is_writer(node) and not atomic:
            found.append((path.name, scope, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, atomic)

    visit(ast.parse(path.read_text()), "", False)
    return found


# --------------------------------------------------------------------------- nothing half-written
def test_every_writer_goes_through_atomic_path():
    found = [w for p in SOURCES for w in _direct_writes(p)]
    unexpected = [w for w in found if w[:2] not in ALLOWED_DIRECT_WRITES]
    assert not unexpected, f"writes outside microbleed.io.atomic_path: {unexpected}"
    assert {w[:2] for w in found} <= set(ALLOWED_DIRECT_WRITES)


def test_the_grep_sees_a_direct_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(df, p):\n    df.to_csv(p)\n    with atomic_path(p) as t:\n        df.to_csv(t)\n")
    assert _direct_writes(bad) == [("bad.py", "f", 2)]


@pytest.mark.parametrize("writer", ["tsv", "image", "checkpoint"])
def test_failure_in_the_middle_of_a_write_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    target = {"tsv": tmp_path / "t.tsv", "image": tmp_path / "i.nii.gz", "checkpoint": tmp_path / "m.pt"}[writer]
    write = {"tsv": lambda v: write_tsv(pd.DataFrame({"x": [v]}), target),
             "image": lambda v: save_image(np.full((4, 4, 4), v, np.float32), np.eye(4), target),
             "checkpoint": lambda v: save_checkpoint(target, {"w": torch.full((3,), v)})}[writer]
    write(1.0)
    before = target.read_bytes()

    def half_then_fail(*args, **kwargs):
        dest = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, os.PathLike)))
        Path(dest).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr({"tsv": pd.DataFrame, "image": __import__("nibabel"), "checkpoint": torch}[writer],
                        {"tsv": "to_csv", "image": "save", "checkpoint": "save"}[writer], half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write(2.0)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]   # no temporary left


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_file(tmp_path):
    target = write_tsv(pd.DataFrame({"x": [1.0, 2.0]}), tmp_path / "t.tsv")
    before = target.read_bytes()
    code = textwrap.dedent(f"""
        import sys, time
        from microbleed.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "w") as fh:
                fh.write("x\\n3.0\\n")
                fh.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert target.read_bytes() == before
    assert list(read_tsv(target, numeric=["x"])["x"]) == [1.0, 2.0]
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(n.startswith(".t.tsv.") for n in leftovers)   # hidden temporary: never read as an output


# --------------------------------------------------------------------------- safe model loading
class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"model": {"w": torch.zeros(2)}, "evil": payload}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "config": {"widths": [2, 4]}, "epoch": 3})
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3


def test_every_torch_load_is_weights_only():
    calls = []
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                calls.append((p.name, node.lineno, kw.get("weights_only")))
    assert calls and all(w is True for _, _, w in calls), calls


# --------------------------------------------------------------------------- no shell
def test_rules_run_only_scripts():
    rule_files = sorted((ROOT / "workflow" / "rules").glob("*.smk")) + [ROOT / "Snakefile"]
    directives = []
    for f in rule_files:
        directives += re.findall(r"^\s+(shell|run|script|notebook|wrapper|cwl):", f.read_text(), re.M)
    n_rules = sum(len(re.findall(r"^(?:rule|checkpoint) \w+:", f.read_text(), re.M)) for f in rule_files)
    assert n_rules > 0 and directives.count("script") == n_rules - 1   # rule `all` has no action
    assert set(directives) == {"script"}


def test_library_subprocess_calls_use_argument_lists():
    found = []
    for p in SOURCES:
        text = p.read_text()
        assert "os.system(" not in text and "os.popen(" not in text, p
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and getattr(node.func.value, "id", "") == "subprocess":
                shell = [k for k in node.keywords if k.arg == "shell"]
                first = node.args[0] if node.args else None
                found.append(p.name)
                assert not shell or getattr(shell[0].value, "value", None) is False, (p, node.lineno)
                assert not isinstance(first, (ast.Constant, ast.JoinedStr)), (p, node.lineno, "command is a string")
    assert found   # bet, synthseg/recon-all and git are run


# --------------------------------------------------------------------------- no path escape
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "x y", "a\\b", "sub-01", "~", "/etc", "x\n"])
def test_subject_ids_cannot_escape(bad):
    with pytest.raises(InputError, match="is not"):
        check_subject_id(bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", ".."])
def test_participants_and_subject_tables_with_escaping_ids(tmp_path, bad):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text(f"participant_id\tgroup\nsub-01\tcmb\nsub-{bad}\tnormal\n")
    with pytest.raises(InputError, match="is not") as exc:
        cohort_table("c", {"bids": str(bids)})
    assert "participants.tsv" in str(exc.value)
    table = tmp_path / "subjects.tsv"
    table.write_text(f"subject\tswi\tphase\n{bad}\ta.nii.gz\tb.nii.gz\n")
    with pytest.raises(InputError, match="is not") as exc:
        cohort_table("c", {"subjects": str(table)})
    assert str(table) in str(exc.value) and "row 1" in str(exc.value)


@pytest.mark.parametrize("bad", ["../c", "a/b", "..", "c d", "c\n"])
def test_cohort_names_cannot_escape(bad):
    with pytest.raises(InputError, match="cohort name"):
        cohort_table(bad, {"simulate": {"seed": 1, "subjects": 2, "normal": 0}})


def test_schemas_restrict_ids_too():
    import yaml
    schema = yaml.safe_load((ROOT / "config" / "schemas" / "config.schema.yaml").read_text())
    subjects = yaml.safe_load((ROOT / "config" / "schemas" / "subjects.schema.yaml").read_text())
    text = str(schema) + str(subjects)
    assert "[A-Za-z0-9" in text
