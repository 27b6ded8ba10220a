"""Devices, seeds, provenance, checkpoints and model cards (shared by every trainer).

A trained model is a folder ``<dir>/model.pt`` + ``<dir>/card.json``. The card
holds the sha256 of ``model.pt``; :func:`load_model_state` refuses a file whose
hash differs, and loads with ``weights_only=True`` (no pickled code runs).
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .io import InputError, atomic_path

__all__ = [
    "select_device", "seed_everything", "provenance", "sha256_file", "array_digest",
    "save_checkpoint", "load_checkpoint", "load_resume_checkpoint", "write_card", "read_card",
    "load_model_state", "CsvLog", "PeakMemory",
]

_log = logging.getLogger(__name__)


def select_device(choice: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``/``cuda`` as asked.

    Asking for ``cuda`` on a machine without a GPU falls back to the CPU with a
    warning rather than failing: GPU rules must run anywhere.
    """
    if choice not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device must be auto|cpu|cuda, got {choice!r}")
    if choice in {"auto", "cuda"} and torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        import warnings
        warnings.warn("device=cuda requested but no GPU is present: running on the CPU")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic_cudnn: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA).

    With ``deterministic_cudnn`` (training), cuDNN also picks deterministic convolution
    algorithms without autotuning. That makes GPU runs closer to repeatable, not exactly so: some
    CUDA backward kernels (3D max-pool, trilinear up-sampling) accumulate in a varying order. On
    the CPU a seeded run repeats exactly, and so does a resumed one.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic_cudnn:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Versions, git commit, host and date, for model cards and run logs."""
    import monai
    import nibabel
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(*arrays: Any) -> str:
    """Hex sha256 of arrays' dtypes, shapes and values: the content of training data, for
    resume checks (the same paths with new contents must not resume an old run)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes() if a.size == 0 else memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a dict of tensors/numbers/strings (weights_only-loadable),
    flushed to disk before it replaces the previous file (a crash leaves the old or the new one)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_resume_checkpoint(path: str | os.PathLike, fingerprint: Mapping[str, Any],
                           epochs: int | None = None) -> dict[str, Any] | None:
    """The per-epoch training checkpoint at ``path`` if it can be resumed, else ``None``.

    ``None`` (training starts over, with a warning naming the file) when the file is absent,
    unreadable (truncated or corrupt: it must not block every later run), was written with
    another ``fingerprint`` (config, subjects or training data) or is past the configured
    ``epochs`` (a run shortened after a longer one: resuming would hand back the longer run's
    model under the shorter run's card; extending a run resumes). Loaded to the CPU, so that a
    device problem (out of GPU memory) is not mistaken for a corrupt file;
    ``load_state_dict`` moves the tensors to the model's device.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        ck = load_checkpoint(path, "cpu")
    except Exception as exc:                     # torch raises RuntimeError, EOFError, pickle errors...
        _log.warning("%s cannot be read (%s: %s): training starts over", path, type(exc).__name__, exc)
        return None
    if not isinstance(ck, dict) or ck.get("fingerprint") != dict(fingerprint):
        _log.warning("%s was written with another config, subject list or training data: training starts over",
                     path)
        return None
    if epochs is not None and int(ck.get("epoch", 0)) > int(epochs):
        _log.warning("%s holds epoch %d, past the configured %d epochs: training starts over",
                     path, int(ck.get("epoch", 0)), int(epochs))
        return None
    return ck


def write_card(model_dir: str | os.PathLike, card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``card.json`` beside ``model.pt``, adding its sha256 and provenance; returns the card
    as written."""
    model_dir = Path(model_dir)
    full = dict(card)
    full["sha256"] = sha256_file(model_dir / "model.pt")
    full.setdefault("provenance", provenance())
    out = model_dir / "card.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(full, indent=2, default=str) + "\n")
    return json.loads(out.read_text())


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``card.json`` of a model folder."""
    path = Path(model_dir) / "card.json"
    if not path.exists():
        raise InputError("model card is missing", path=path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"model card is not valid JSON ({exc})", path=path) from exc


def load_model_state(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``model.pt`` after checking its sha256 against ``card.json``.

    Returns:
        ``(checkpoint, card)``; the checkpoint is what the trainer saved (it holds
        ``"model"``, the state dict, and ``"config"``).
    Raises:
        InputError: missing files or a sha256 mismatch (the file was changed or
            corrupted after release).
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    weights = model_dir / "model.pt"
    if not weights.exists():
        raise InputError("model weights are missing", path=weights)
    digest = sha256_file(weights)
    if digest != card.get("sha256"):
        raise InputError(f"sha256 mismatch: file has {digest}, card.json says {card.get('sha256')}; "
                         "refusing to load a model that differs from its card", path=weights)
    return load_checkpoint(weights, map_location), card


class CsvLog:
    """Append-only CSV log (one row per step/epoch); survives resume.

    Example:
        >>> log = CsvLog("train.csv", ["epoch", "loss"])   # doctest: +SKIP
        >>> log.write(epoch=1, loss=0.5)                   # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, fields: list[str]):
        self.path = Path(path)
        self.fields = list(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.fields)

    def truncate_after(self, key: str, value: float) -> None:
        """Drop rows whose ``key`` is greater than ``value`` (rows of an epoch lost to a kill)."""
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))

        def kept(row: Mapping[str, Any]) -> bool:
            try:
                return float(row[key]) <= value
            except (TypeError, ValueError):          # a row cut short by a kill
                return False
        keep = [r for r in rows if kept(r) and None not in r.values()]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.fields)
                w.writeheader()
                w.writerows(keep)

    def write(self, **row: Any) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerow(row)


class PeakMemory:
    """Peak resident memory (CPU: /proc/self/statm sampled every 5 ms) or peak CUDA allocation, MB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
