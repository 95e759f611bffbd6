"""Checkpoints: one file loadable with plain `torch.load`, written atomically (write, fsync, rename).

Contents: theta (tensors by name), optimizer name and state, version, sync step, worker clocks,
counters, the server config and the job description sent by the first worker.

Usage::

    save_checkpoint("run/ckpt.pt", server_state)
    state = torch.load("run/ckpt.pt")          # weights_only loading works: no custom classes
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from common.config import ConfigError


def _to_torch(tree):
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree, copy=True))
    if isinstance(tree, dict):
        return {k: _to_torch(v) for k, v in tree.items()}
    return tree


def _to_numpy(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return tree


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` (numpy arrays become tensors) to `path` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_to_torch(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `save_checkpoint`; tensors come back as numpy arrays.

    A missing file, a folder, a truncated file or a file that is not a paramserver checkpoint raises
    ConfigError with one line that says which."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"checkpoint {path!r} is a folder; give the checkpoint file (e.g. {path}/checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch's own text suggests weights_only=False: bad advice for a file we did not write
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"   # torch.save writes a zip archive: one cut short starts alike
        if zipped or "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
            why = "it is truncated or damaged (an interrupted copy?)"
        else:
            why = "it is not a checkpoint written by paramserver"
        raise ConfigError(f"checkpoint {path!r} cannot be read: {why} ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "theta" not in state or "version" not in state:
        raise ConfigError(f"checkpoint {path!r} is a torch file but not a paramserver checkpoint (no theta/version)")
    return _to_numpy(state)
