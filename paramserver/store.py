"""Parameters by name: theta, its version, the gradient check, divergence samples and checksums.

theta lives here as float numpy arrays keyed by parameter name. `apply(g)` is the only place theta
changes: one step of the update rule (paramserver/update.py, where the math is written out), then
version += 1. The step runs in torch on tensors that share memory with those arrays, so this module
(and so the server) imports torch.

Pulls are answered from `snapshot()`, (version, read-only views of theta) that never change: an update
that finds theta still being sent first moves it to another buffer (copy on write; the buffers, their
recycling and the 16-bit wire copies are paramserver/snapshots.py's).

Usage::

    store = ParamStore(optimizer="sgd", lr=0.1); store.init({"w": np.zeros(3, np.float32)})
    store.apply({"w": np.ones(3, np.float32)})      # theta := theta - lr * g ; version 1
    version, theta = store.snapshot(); tracker = sock.send_multipart(..., track=True); store.track(version, tracker)
"""
from __future__ import annotations

import math
import zlib
from typing import Mapping

import numpy as np

from common.protocol import MAX_GRADIENT, Encoded, within_bounds
from paramserver.snapshots import POOL_KEEP, Snapshots  # noqa: F401 (POOL_KEEP: read as store.POOL_KEEP)
from paramserver.update import UpdateRule, grad_tensor, warm_up

#: divergence is estimated from at most this many coordinates of theta (exact below it)
DIVERGENCE_SAMPLE = 65536
#: the sampled coordinates come in runs of this many neighbours (a few cache lines each, not one line per value)
SAMPLE_RUN = 512


def theta_crc32(theta: dict[str, np.ndarray]) -> str:
    """A checksum of theta (names and bytes, in name order): equal checksums mean bit-identical theta."""
    crc = 0
    for name in sorted(theta):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(theta[name]).view(np.uint8), crc)
    return f"{crc:08x}"


class ParamStore:
    """theta by name and its version; its update rule (`rule`) and its snapshots for pulls (`snapshots`)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, spares: int = 2,
                 stall_s: float = 0.5, period: int = 1):
        warm_up()
        self.snapshots = Snapshots(spares, stall_s)
        self.rule = UpdateRule(optimizer, lr, momentum, beta1, beta2, eps, period)
        self.theta: dict[str, np.ndarray] = {}
        self.version = 0        # number of updates applied
        self.opt_steps = 0      # Adam's t (equals version unless restored from another optimizer)
        self._checksum: str | None = None   # theta_crc32 of the current theta, computed on demand
        self._sample: tuple[int, dict[str, np.ndarray]] | None = None
        self._sample_at: dict[str, np.ndarray | None] | None = None   # which coordinates sample() takes

    # the snapshot buffers' settings and counters (the server's status reports them)
    spares = property(lambda self: self.snapshots.spares)
    stall_s = property(lambda self: self.snapshots.stall_s)
    copies = property(lambda self: self.snapshots.copies)
    allocations = property(lambda self: self.snapshots.allocations)
    waited_s = property(lambda self: self.snapshots.waited_s)
    over_cap = property(lambda self: self.snapshots.over_cap)
    # 16-bit gradients widened for a fused optimizer (None until one was), read by tests
    _widen_buf = property(lambda self: self.rule.widen_buf)

    @property
    def initialized(self) -> bool:
        return bool(self.theta)

    def init(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Adopt initial parameters (copied). Only the first call counts; later ones are ignored."""
        if self.initialized:
            return
        bad = [n for n, t in tensors.items() if t.dtype.kind != "f"]
        if bad:
            raise ValueError(f"parameters must be floating point; not: {', '.join(bad)}")
        if not tensors:
            raise ValueError("a model with no parameters cannot be trained")
        self._adopt({n: np.array(t, copy=True) for n, t in tensors.items()}, {})

    def _adopt(self, theta: dict[str, np.ndarray], state: Mapping) -> None:
        """Make `theta` (owned arrays) the live buffer and build the optimizer over it."""
        self.theta = theta
        self.snapshots.reset(theta, self.version)
        self.rule.build(theta, state, self.opt_steps)
        self._sample = self._checksum = self._sample_at = None

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer slots per parameter as numpy arrays (views of the optimizer's own tensors)."""
        return self.rule.state()

    def layout(self) -> dict[str, list]:
        """{name: [dtype, shape]}: what every push must match."""
        return {n: [t.dtype.name, list(t.shape)] for n, t in self.theta.items()}

    def check_gradient(self, grads: Mapping[str, np.ndarray], checked: Mapping[str, bool] | None = None) -> None:
        """Raise ValueError (naming the problem) unless `grads` fits theta exactly and is finite. `checked`:
        {name: finite?} for tensors whose values were already checked (as they were copied, common/shm.py)."""
        missing = sorted(set(self.theta) - set(grads))
        unknown = sorted(set(grads) - set(self.theta))
        if unknown:
            raise ValueError(f"unknown parameter name(s): {', '.join(unknown[:5])}; the server holds "
                             f"{len(self.theta)} parameters (see the WELCOME layout)")
        if missing:
            raise ValueError(f"gradient is missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
        for name, g in grads.items():
            t = self.theta[name]
            if g.shape != t.shape:
                raise ValueError(f"wrong shape for {name!r}: got {list(g.shape)}, expected {list(t.shape)}")
            if isinstance(g, Encoded):   # 16-bit wire values of a float32 gradient (plain SGD takes them as they are)
                if t.dtype != np.float32:
                    raise ValueError(f"wrong dtype for {name!r}: got {g.wire} wire values, expected {t.dtype.name}")
            elif g.dtype != t.dtype:
                raise ValueError(f"wrong dtype for {name!r}: got {g.dtype.name}, expected {t.dtype.name}")
            if not (checked[name] if checked and name in checked else _finite(g)):
                raise ValueError(f"non-finite gradient (NaN or Inf) or a value beyond +-{MAX_GRADIENT:g} in {name!r}; "
                                 "rejected, theta unchanged")

    def apply(self, grads: Mapping[str, np.ndarray], scale: float = 1.0, lr_scale: float = 1.0) -> int:
        """One step of the update rule (paramserver/update.py) with gradient `scale * grads` (already checked)
        and learning rate `lr_scale * lr`. Returns the new version."""
        old = self._move_theta(copy=not self.rule.writes_around)
        self.rule.apply(grads, scale, lr_scale, old)
        self.opt_steps += 1
        self.version += 1
        self.snapshots.live.version = self.version
        self._checksum = None
        return self.version

    def _move_theta(self, copy: bool) -> dict | None:
        """Before theta changes: if a send may still read it, move theta to other arrays (copied, or with
        `copy=False` left for the step to fill). Returns the arrays theta moved out of, else None."""
        arrays = self.snapshots.writable(self.theta, copy)
        if arrays is None:
            return None
        old, self.theta = self.theta, arrays
        self.rule.rebind(arrays)
        return old

    def accumulate(self, total: Mapping[str, np.ndarray] | None, g: Mapping[str, np.ndarray]) -> Mapping:
        """Σ of a sync step: `total + g` in one reused buffer (see UpdateRule.accumulate)."""
        return self.rule.accumulate(total, g)

    # -- snapshots (paramserver/snapshots.py) ----------------------------------------------------

    def snapshot(self, wire: str = "fp32") -> tuple[int, dict]:
        """(version, theta) for a reply: read-only views that never change. Pass the send's
        MessageTracker to `track(version, tracker, wire)`; an untracked snapshot is never recycled.
        With wire "bf16" / "fp16" the values are `Encoded` 16-bit copies, made once per version."""
        return self.snapshots.take(self.theta, self.version, wire)

    def track(self, version: int, tracker, wire: str = "fp32") -> None:
        """The snapshot of `version` handed out by `snapshot()` is being sent; `tracker.done` says
        when ZeroMQ no longer reads it (pyzmq's MessageTracker). Unknown versions are ignored."""
        self.snapshots.track(version, tracker, wire)

    def in_flight(self) -> int:
        """Snapshot buffers (theta-sized, fp32 or 16-bit) that sends still read, the live one included."""
        return self.snapshots.in_flight()

    # -- divergence ----------------------------------------------------------------------------

    def sample(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, a fixed sample of theta's coordinates): at most DIVERGENCE_SAMPLE values in all (all of
        theta when it is smaller), copied once per version."""
        if self._sample is None or self._sample[0] != self.version:
            self._sample = (self.version, {n: self._sampled(n) for n in self.theta})
        return self._sample

    def _sampled(self, name: str) -> np.ndarray:
        at = self._coordinates()[name]
        flat = self.theta[name].reshape(-1)
        return flat.copy() if at is None else flat.take(at)

    def _coordinates(self) -> dict[str, np.ndarray | None]:
        """Per tensor, the flat indices sample() takes (None: all of it): its share of DIVERGENCE_SAMPLE, in runs
        of SAMPLE_RUN neighbours spread evenly over the tensor. A value at a fixed stride cost one cache miss
        per value, 1 ms per pull at 10M values just after an update; runs cost one per 16 values."""
        if self._sample_at is None:
            total = sum(t.size for t in self.theta.values())
            self._sample_at = {}
            for name, t in self.theta.items():
                want = t.size if total <= DIVERGENCE_SAMPLE else max(1, t.size * DIVERGENCE_SAMPLE // total)
                if want >= t.size:
                    self._sample_at[name] = None
                    continue
                runs = max(2, -(-want // SAMPLE_RUN))   # at least 2: the first and the last run are the tensor's ends
                run = max(1, min(SAMPLE_RUN, want // runs, t.size // runs))   # runs never overlap
                starts = np.linspace(0, t.size - run, runs).round().astype(np.int64)
                self._sample_at[name] = (starts[:, None] + np.arange(run, dtype=np.int64)).reshape(-1)
        return self._sample_at

    def distance(self, sample: Mapping[str, np.ndarray]) -> float:
        """||theta - theta_then||, theta_then given by its `sample()`: exact when the sample is all of theta,
        else estimated from the sampled coordinates (scaled by sqrt(total / sampled))."""
        total = sum(t.size for t in self.theta.values())
        sq, n = 0.0, 0
        for name, then in sample.items():
            d = self._sampled(name).astype(np.float64) - then
            sq += float(np.dot(d, d))
            n += d.size
        return math.sqrt(sq * total / n) if n else 0.0

    # -- checksum and checkpoints --------------------------------------------------------------

    def checksum(self) -> str:
        """theta_crc32(theta), computed once per change of theta."""
        if self._checksum is None:
            self._checksum = theta_crc32(self.theta)
        return self._checksum

    def state_dict(self) -> dict:
        return {"theta": {n: t.copy() for n, t in self.theta.items()},
                "optimizer_state": {n: {k: v.copy() for k, v in s.items()} for n, s in self.state.items()},
                "version": self.version, "opt_steps": self.opt_steps}

    def load_state_dict(self, sd: Mapping) -> None:
        self.version = int(sd["version"])
        self.opt_steps = int(sd.get("opt_steps", self.version))
        self._adopt({n: np.array(t, copy=True) for n, t in sd["theta"].items()}, sd.get("optimizer_state", {}))


def _finite(g) -> bool:
    """All values finite and within +-MAX_GRADIENT? One read-only pass without a temporary: the smallest and
    the largest value are within the bounds exactly when every value is (NaN propagates into both and fails
    every comparison; +Inf shows in the largest, -Inf in the smallest)."""
    if not isinstance(g, Encoded) and g.size < 1 << 16:   # below 64K values a call's overhead dominates
        return within_bounds(g)
    # torch's min+max is one vectorized pass on the server's threads, faster than a sum (which also had to be
    # re-checked on overflow): 0.9 ms for 16 x 625K floats on 2 threads against 1.4 ms for torch.sum and 1.8 ms
    # for numpy's; 16-bit wire values are read as they are
    return within_bounds(grad_tensor(g))
