"""Parameters by name, the server-side optimizer, and the update rule.

theta lives here as float numpy arrays keyed by parameter name. `apply(g)` is the only place
theta changes: one optimizer step with an (already aggregated) gradient, then version += 1.
Pulls are answered from `snapshot()`, an immutable copy per version, so a zero-copy send never
reads a buffer that the next update changes in place.

Usage::

    store = ParamStore(optimizer="sgd", lr=0.1); store.init({"w": np.zeros(3, np.float32)})
    store.apply({"w": np.ones(3, np.float32)})      # theta := theta - lr * g ; version 1
    version, theta = store.snapshot()
"""
from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np


def theta_crc32(theta: dict[str, np.ndarray]) -> str:
    """A checksum of theta (names and bytes, in name order): equal checksums mean bit-identical theta."""
    crc = 0
    for name in sorted(theta):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(theta[name]).view(np.uint8), crc)
    return f"{crc:08x}"


class ParamStore:
    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.theta: dict[str, np.ndarray] = {}
        self.state: dict[str, dict[str, np.ndarray]] = {}  # optimizer slots per parameter
        self.version = 0        # number of updates applied
        self.opt_steps = 0      # Adam's t (equals version unless restored from another optimizer)
        self._snapshot: tuple[int, dict[str, np.ndarray]] | None = None
        self._checksum: str | None = None   # theta_crc32 of the current theta, computed on demand

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
        self.theta = {n: np.array(t, copy=True) for n, t in tensors.items()}
        self._snapshot = self._checksum = None

    def layout(self) -> dict[str, list]:
        """{name: [dtype, shape]}: what every push must match."""
        return {n: [t.dtype.name, list(t.shape)] for n, t in self.theta.items()}

    def check_gradient(self, grads: Mapping[str, np.ndarray]) -> None:
        """Raise ValueError (naming the problem) unless `grads` fits theta exactly and is finite."""
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
            if g.dtype != t.dtype:
                raise ValueError(f"wrong dtype for {name!r}: got {g.dtype.name}, expected {t.dtype.name}")
            if not np.isfinite(g).all():
                raise ValueError(f"non-finite gradient (NaN or Inf) in {name!r}; rejected, theta unchanged")

    def apply(self, grads: Mapping[str, np.ndarray], scale: float = 1.0, lr_scale: float = 1.0) -> int:
        """One optimizer step with gradient `scale * grads` (already checked) and learning rate
        `lr_scale * lr`. Returns the new version."""
        self.opt_steps += 1
        lr = self.lr * lr_scale
        for name, theta in self.theta.items():
            g = grads[name]
            if scale != 1.0:
                g = g * np.asarray(scale, dtype=theta.dtype)
            if self.optimizer == "sgd":
                theta -= np.asarray(lr, theta.dtype) * g
            elif self.optimizer == "momentum":
                buf = self.state.setdefault(name, {}).get("momentum")
                if buf is None:
                    buf = self.state[name]["momentum"] = np.array(g, dtype=theta.dtype, copy=True)
                else:
                    buf *= self.momentum
                    buf += g
                theta -= np.asarray(lr, theta.dtype) * buf
            else:  # adam
                slots = self.state.setdefault(name, {})
                m = slots.setdefault("exp_avg", np.zeros_like(theta))
                v = slots.setdefault("exp_avg_sq", np.zeros_like(theta))
                m *= self.beta1
                m += (1 - self.beta1) * g
                v *= self.beta2
                v += (1 - self.beta2) * np.square(g)
                bc1 = 1 - self.beta1 ** self.opt_steps
                bc2 = 1 - self.beta2 ** self.opt_steps
                denom = np.sqrt(v / bc2) + self.eps
                theta -= (lr / bc1) * m / denom
        self.version += 1
        self._snapshot = self._checksum = None
        return self.version

    def snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, theta copy). The copy is made once per version and never mutated."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, {n: t.copy() for n, t in self.theta.items()})
        return self._snapshot

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
        self.theta = {n: np.array(t, copy=True) for n, t in sd["theta"].items()}
        self.state = {n: {k: np.array(v, copy=True) for k, v in s.items()}
                      for n, s in sd.get("optimizer_state", {}).items()}
        self.version = int(sd["version"])
        self.opt_steps = int(sd.get("opt_steps", self.version))
        self._snapshot = self._checksum = None
