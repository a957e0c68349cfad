"""Training-state checkpoints written atomically and read back with ``torch.load(weights_only=True)``.

``last.pt`` and ``best.pt`` in the run's ``checkpoints/`` folder hold everything a resumed run needs: model, EMA,
optimiser and scheduler state, the step, the data position, the RNG states and the config. They are written to a
temporary file in the same folder, flushed to disk (fsync) and moved over the old file with ``os.replace``, so a run
killed during the write keeps its previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..checkpoints.files import read_torch, sniff
from ..errors import VitlabError

STATE_FORMAT = "vitlab-train-state"
STATE_VERSION = 1


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`vitlab.atomic.atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """The global RNG states (Python, numpy's legacy generator as a plain dict, torch CPU and CUDA)."""
    np_state = np.random.get_state(legacy=False)
    # numpy's MT19937 key as a tensor: weights_only loading accepts tensors and plain numbers, not numpy arrays
    numpy_state = {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                   "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                   "gauss": float(np_state["gauss"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_train_state(path: str | Path) -> dict:
    """Read a training-state file safely (``weights_only=True``) and check that it is one."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path}: no such checkpoint")
    try:
        kind = sniff(path)  # HTML pages, pickles, lying archives: refused from their bytes, before torch.load
        if kind not in ("torch-zip", "torch-legacy"):
            raise VitlabError(f"{path}: a {kind} file, not a torch.save file")
        state = read_torch(path)
    except VitlabError as exc:
        raise VitlabError(f"not a readable vitlab training checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise VitlabError(f"{path}: not a vitlab training checkpoint (use `vitlab finetune --from` for model files)")
    if state.get("version", 0) > STATE_VERSION:
        raise VitlabError(f"{path}: written by a newer vitlab (state version {state['version']})")
    return state
