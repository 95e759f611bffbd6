"""Data sets, sharding and batch order.

* The text corpus for the GPT job: by default the Python standard library's own `.py` sources,
  found at run time (no download); `--data PATH` takes a text file or a folder: only its text
  files are read (compressed and binary files are skipped and counted: by name, magic number,
  NUL and control bytes). Files are split into train and held-out by a stable hash of their path.
* Synthetic regression data for the `mlp` and `linear` jobs.
* Sharding: sample indices 0..n-1 split over M workers, `contiguous`, `random` (a seeded
  permutation cut M ways) or `hash` (a stable hash of the index mod M). Shards are disjoint
  and cover the data set.
* `batches(...)`: the deterministic batch order of one worker, epoch after epoch.

Usage::

    shard = shard_indices(n, num_workers=4, rank=1, strategy="hash", seed=0)
    for epoch, idx in batches(shard, batch_size=16, seed=0):  ...
"""
from __future__ import annotations

import os
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from common.config import ConfigError

VAL_EVERY = 20  # one file in 20 (by path hash) is held out


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


BINARY_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".7z", ".tar", ".jar", ".whl", ".png", ".jpg",
                   ".jpeg", ".gif", ".ico", ".pdf", ".so", ".o", ".a", ".dll", ".exe", ".pyc", ".bin", ".pt", ".npy",
                   ".npz", ".db", ".sqlite", ".mo")
MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x7fELF", b"%PDF", b"\x89PNG")
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f\x1b") + b"\x7f"


def why_not_text(path: str) -> str:
    """'' for a text file, else why it is skipped: compressed or binary (by name or content), unreadable."""
    if path.lower().endswith(BINARY_SUFFIXES):
        return "compressed or binary (by name)"
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return "unreadable"
    if head.startswith(MAGIC):
        return "compressed or binary (by content)"
    if b"\0" in head or (head and len(head.translate(None, _CONTROL)) < 0.95 * len(head)):
        return "binary (NUL or control bytes)"
    return ""


def scan_text_files(path: str) -> tuple[list[str], dict[str, int]]:
    """(the text files under `path`, {reason: count} of the files skipped)."""
    if os.path.isfile(path):
        why = why_not_text(path)
        if why:
            raise ConfigError(f"--data {path!r} is not a text file: {why}")
        return [path], {}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path!r}: no such file or folder")
    found, skipped = [], {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = os.path.join(dirpath, name)
            why = why_not_text(f)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            else:
                found.append(f)
    return found, skipped


def text_files(path: str) -> list[str]:
    return scan_text_files(path)[0]


def load_corpus(path: str = "", max_bytes: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(train bytes, held-out bytes, description) as uint8 arrays. The description says how many files
    were read and how many were skipped as not text, and why."""
    files, skipped = scan_text_files(path) if path else (stdlib_files(), {})
    if not files:
        why = f" (skipped: {_skips(skipped)})" if skipped else ""
        raise ConfigError(f"--data {path!r}: no text files found{why}" if path else "no .py files found in the "
                          "Python standard library; pass --data PATH")
    base = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    train, val, total, used = [], [], 0, 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                blob = fh.read()
        except OSError:
            continue
        rel = os.path.relpath(f, base).encode()
        (val if zlib.crc32(rel) % VAL_EVERY == 0 else train).append(blob)
        total += len(blob)
        used += 1
        if max_bytes and total >= max_bytes:
            break
    if len(files) == 1 or not val or not train:   # one file: hold out its last 5%
        blob = b"".join(train + val)
        cut = int(len(blob) * 0.95)
        train, val = [blob[:cut]], [blob[cut:]]
    tr = np.frombuffer(b"".join(train), dtype=np.uint8)
    va = np.frombuffer(b"".join(val), dtype=np.uint8)
    where = path or "the Python standard library (.py)"
    skip = f"; skipped {sum(skipped.values())} non-text files: {_skips(skipped)}" if skipped else ""
    return tr, va, (f"{where}: {len(tr) + len(va):,} bytes from {used} file(s) ({len(tr):,} train, {len(va):,} "
                    f"held out){skip}")


def _skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def synthetic_regression(n: int, d: int, seed: int, nonlinear: bool) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1); y = x.w (+ tanh features when nonlinear) + small noise. Deterministic in seed."""
    rng = np.random.default_rng(seed + 12345)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, 1)).astype(np.float32) / np.sqrt(d)
    y = x @ w
    if nonlinear:
        y = y + np.tanh(x[:, :1] * x[:, 1:2])
    y = y + 0.01 * rng.standard_normal((n, 1)).astype(np.float32)
    return x, y.astype(np.float32)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a stable hash of integers, identical on every machine."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def shard_indices(n: int, num_workers: int, rank: int, strategy: str = "random", seed: int = 0) -> np.ndarray:
    """The sample indices worker `rank` of `num_workers` owns."""
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} is outside 0..{num_workers - 1}")
    idx = np.arange(n, dtype=np.int64)
    if strategy == "contiguous":
        return np.array_split(idx, num_workers)[rank]
    if strategy == "random":
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(np.array_split(perm, num_workers)[rank])
    if strategy == "hash":
        return idx[_mix64(idx + np.uint64(seed)) % np.uint64(num_workers) == np.uint64(rank)]
    raise ValueError(f"unknown --shard {strategy!r}; choose contiguous, random or hash")


def batches(shard: np.ndarray, batch_size: int, seed: int, epochs: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, indices) for consecutive batches: each epoch a seeded shuffle of the shard, cut into full
    batches (a remainder smaller than batch_size is skipped). epochs=0 means forever."""
    if len(shard) < batch_size:
        raise ConfigError(f"a shard of {len(shard)} samples cannot fill one batch of {batch_size}; "
                         "use fewer workers or a smaller --batch-size")
    epoch = 0
    while not epochs or epoch < epochs:
        order = np.random.default_rng([seed, epoch]).permutation(shard)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield epoch, order[start:start + batch_size]
        epoch += 1
