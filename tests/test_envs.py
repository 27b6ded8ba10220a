"""envs/python.yaml stays in step with pyproject.toml's dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_python_env_matches_pyproject():
    deps = dict(_norm(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "envs" / "python.yaml").read_text())["dependencies"]
    listed = {}
    for item in env:
        for req in (item["pip"] if isinstance(item, dict) else [item]):
            if req.startswith("-e") or req in ("pip",) or req.startswith("python="):
                continue
            name, spec = _norm(req)
            listed[name] = spec
    assert set(deps) == set(listed), f"only in pyproject: {set(deps) - set(listed)}; only in env: {set(listed) - set(deps)}"
    for name, spec in deps.items():
        if name == "torch":  # the env pins the exact CPU/GPU-agnostic release the Makefile installs
            assert listed[name] == "==2.13.0"
        else:
            assert listed[name] == spec, f"{name}: pyproject {spec} vs env {listed[name]}"


def test_every_env_installs_the_package():
    for env in ["python.yaml", "fsl.yaml", "freesurfer.yaml"]:
        text = (ROOT / "envs" / env).read_text()
        assert "-e ../" in text, env


def test_makefile_pins_torch():
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()
