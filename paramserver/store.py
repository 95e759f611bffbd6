"""Parameters by name, the server-side optimizer, and the update rule.

theta lives here as float numpy arrays keyed by parameter name. `apply(g)` is the only place
theta changes: one optimizer step with an (already aggregated) gradient, then version += 1.
The step runs in torch on tensors that share memory with those arrays: `torch.optim`'s fused
(single pass) Adam and momentum SGD and `_foreach_add_` for plain SGD, so the results are
`torch.optim`'s own; the optimizer state is allocated once, at the first step.

Pulls are answered from `snapshot()`, (version, read-only views of theta). Nothing is copied per
version: the server hands the tracker of every send of a snapshot to `track()`, and an update
that finds theta still being sent (or handed out untracked) first moves theta to a recycled
buffer (copy on write), leaving the old one frozen until ZeroMQ has let go of it. So a pull
never sees theta change under it, and memory stays theta + optimizer state + the snapshots in
flight. `snapshot("bf16")` / `snapshot("fp16")` give 16-bit wire copies, one per version, pooled
the same way.

Usage::

    store = ParamStore(optimizer="sgd", lr=0.1); store.init({"w": np.zeros(3, np.float32)})
    store.apply({"w": np.ones(3, np.float32)})      # theta := theta - lr * g ; version 1
    version, theta = store.snapshot(); tracker = sock.send_multipart(..., track=True); store.track(version, tracker)
"""
from __future__ import annotations

import math
import time
import warnings
import zlib
from typing import Mapping

import numpy as np
import torch

from common.protocol import MAX_GRADIENT, WIRE_DTYPES, Encoded, decode_wire, encode_wire, within_bounds

#: divergence is estimated from at most this many coordinates of theta (exact below it)
DIVERGENCE_SAMPLE = 65536
#: the sampled coordinates come in runs of this many neighbours (a few cache lines each, not one line per value)
SAMPLE_RUN = 512
#: 16-bit gradients are added to theta in slices of this many values (see _add)
MIXED_SLICE = 1 << 20
#: a fused optimizer's 16-bit gradients are widened at most this many values at a time (see _step_widened)
WIDEN_CHUNK = 1 << 22
#: free 16-bit wire snapshot buffers kept for reuse (more are released to the allocator)
POOL_KEEP = 2


def theta_crc32(theta: dict[str, np.ndarray]) -> str:
    """A checksum of theta (names and bytes, in name order): equal checksums mean bit-identical theta."""
    crc = 0
    for name in sorted(theta):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(theta[name]).view(np.uint8), crc)
    return f"{crc:08x}"


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (read-only arrays too: torch only reads them here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _readonly(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for n, a in arrays.items():
        v = a.view()
        v.flags.writeable = False
        out[n] = v
    return out


class _Buffer:
    """One set of theta-shaped arrays and the sends that still read it."""

    __slots__ = ("arrays", "version", "trackers", "leases")

    def __init__(self, arrays: dict, version: int = -1):
        self.arrays, self.version, self.leases = arrays, version, 0
        self.trackers: list = []   # (MessageTracker, when the send began)

    def busy(self) -> bool:
        """Somebody may still read it: an untracked hand-out, or a send ZeroMQ has not finished."""
        if self.leases:
            return True
        self.trackers = [(t, t0) for t, t0 in self.trackers if not t.done]
        return bool(self.trackers)

    def stalled(self, now: float, after: float) -> bool:
        """Has one of its sends been going on for over `after` seconds (a slow or stalled reader)?"""
        return any(now - t0 > after for t, t0 in self.trackers if not t.done)

    def wait(self, after: float) -> float:
        """Until no send reads it any more or one of them has taken `after` s; returns the seconds waited."""
        t0 = time.monotonic()
        while self.busy() and not self.stalled(time.monotonic(), after):
            time.sleep(0.0005)
        return time.monotonic() - t0


_warm = False


def _warm_up() -> None:
    """Build a torch optimizer once per process, at start-up: the first one imports much of torch
    (seconds; 9 s measured on a loaded 2-core machine), which must not delay the first REGISTER."""
    global _warm
    if not _warm:
        _warm = True
        torch.optim.Adam([torch.zeros(1)], fused=True)
        torch.optim.SGD([torch.zeros(1)], momentum=0.9, fused=True)


class ParamStore:
    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, spares: int = 2,
                 stall_s: float = 0.5):
        _warm_up()
        if spares < 0:
            raise ValueError(f"--snapshot-buffers must be >= 0, not {spares}")
        self.spares = spares    # theta-sized buffers that sends in flight may hold besides theta itself
        # a send of theta older than this belongs to a slow or stalled reader: an update no longer waits for it,
        # and its buffer no longer counts against `spares` (so one stalled worker cannot make every update wait)
        self.stall_s = stall_s
        self.waited_s = 0.0     # time updates spent waiting for a send to release a buffer (the cap)
        self.over_cap = 0       # buffers allocated beyond the cap because the sends were slow (pinned)
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.theta: dict[str, np.ndarray] = {}
        self.version = 0        # number of updates applied
        self.opt_steps = 0      # Adam's t (equals version unless restored from another optimizer)
        self._checksum: str | None = None   # theta_crc32 of the current theta, computed on demand
        self._live: _Buffer | None = None   # the buffer theta lives in
        self._frozen: list[_Buffer] = []    # former theta buffers still being sent
        self._free: list[dict] = []         # theta-shaped buffers ready for reuse
        self._wire: dict[str, _Buffer] = {}            # wire dtype -> 16-bit snapshot of the current version
        self._wire_frozen: list[tuple[str, _Buffer]] = []
        self._wire_free: dict[str, list[dict]] = {}
        self._params: list[torch.Tensor] = []   # torch views of theta, in self.theta's order
        self._opt: torch.optim.Optimizer | None = None
        self._scratch: list[torch.Tensor] | None = None   # scale * g, allocated once when needed
        self._widen_buf: np.ndarray | None = None   # 16-bit gradients widened for a fused optimizer (see _step_widened)
        self._sum: dict[str, np.ndarray] | None = None     # sync: the step's gradient sum, allocated once
        self._sample: tuple[int, dict[str, np.ndarray]] | None = None
        self._sample_at: dict[str, np.ndarray | None] | None = None   # which coordinates sample() takes
        self.copies = 0         # copy-on-write moves of theta (a send was still reading it)
        self.allocations = 0    # snapshot buffers allocated (not recycled)

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
        self._live = _Buffer(theta, self.version)
        self._frozen, self._free, self._wire, self._wire_frozen, self._wire_free = [], [], {}, [], {}
        self._params = [_tensor(a) for a in theta.values()]
        self._scratch = self._sum = self._widen_buf = None
        self._sample = self._checksum = self._sample_at = None
        fused = all(p.dtype in (torch.float32, torch.float64) for p in self._params)
        if self.optimizer == "adam":
            self._opt = torch.optim.Adam(self._params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                                         fused=fused or None)
        elif self.optimizer == "momentum":
            self._opt = torch.optim.SGD(self._params, lr=self.lr, momentum=self.momentum, fused=fused or None)
        else:
            self._opt = None
        for name, p in zip(theta, self._params):   # restored optimizer slots (a checkpoint)
            slots = state.get(name)
            if not slots or self._opt is None:
                continue

            def slot(key):
                return torch.from_numpy(np.array(slots[key], dtype=theta[name].dtype))
            if self.optimizer == "adam" and "exp_avg" in slots:
                step = torch.tensor(float(self.opt_steps), dtype=torch.float32 if fused else torch.get_default_dtype())
                self._opt.state[p] = {"step": step, "exp_avg": slot("exp_avg"), "exp_avg_sq": slot("exp_avg_sq")}
            elif self.optimizer == "momentum" and "momentum" in slots:
                self._opt.state[p] = {"momentum_buffer": slot("momentum")}

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer slots per parameter as numpy arrays (views of the optimizer's own tensors)."""
        if self._opt is None:
            return {}
        out = {}
        for name, p in zip(self.theta, self._params):
            s = self._opt.state.get(p, {})
            if "exp_avg" in s:
                out[name] = {"exp_avg": s["exp_avg"].numpy(), "exp_avg_sq": s["exp_avg_sq"].numpy()}
            elif s.get("momentum_buffer") is not None:
                out[name] = {"momentum": s["momentum_buffer"].numpy()}
        return out

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
        """One optimizer step with gradient `scale * grads` (already checked) and learning rate
        `lr_scale * lr`. Returns the new version."""
        lr = self.lr * lr_scale
        if self.optimizer == "sgd":
            # theta -= (lr * scale) * g: one pass, no temporary; 16-bit wire values (Encoded) are added as they are,
            # slice by slice (torch widens each slice exactly as decode_wire would, into a small reused buffer: no
            # float32 copy of the whole gradient). When a send still reads theta, the result is written into a
            # recycled buffer instead (the same pass)
            g = [_grad(grads[n]) for n in self.theta]
            old = self._writable(copy=False)
            sources = self._params if old is None else [_tensor(a) for a in old.values()]
            if old is None and not any(isinstance(x, Encoded) for x in grads.values()):
                torch._foreach_add_(self._params, g, alpha=-lr * scale)
            else:
                for p, src, x in zip(self._params, sources, g):
                    _add(p, src, x, -lr * scale)
        elif any(isinstance(x, Encoded) for x in grads.values()):   # 16-bit values for a fused optimizer
            self._writable()
            for group in self._opt.param_groups:
                group["lr"] = lr
            self._step_widened(grads, scale)
        else:   # torch's fused optimizers want float32 gradients
            g = [_tensor(np.asarray(grads[n])) for n in self.theta]
            self._writable()
            if scale != 1.0 and grads is self._sum:   # our own sum buffer: scaled where it is
                torch._foreach_mul_(g, scale)
            elif scale != 1.0:
                if self._scratch is None:
                    self._scratch = [torch.empty_like(p) for p in self._params]
                for s, x in zip(self._scratch, g):
                    torch.mul(x, scale, out=s)
                g = self._scratch
            for p, x in zip(self._params, g):
                p.grad = x
            for group in self._opt.param_groups:
                group["lr"] = lr
            self._opt.step()
            for p in self._params:
                p.grad = None
        self.opt_steps += 1
        self.version += 1
        self._live.version = self.version
        self._checksum = None
        return self.version

    def _step_widened(self, grads: Mapping, scale: float) -> None:
        """One step of the fused optimizer with 16-bit wire gradients (ssp/async: applied as they come), without
        a float32 copy of the whole gradient: tensors are widened into one reused buffer of WIDEN_CHUNK values
        (or of the largest tensor), and each batch of tensors that fits it gets its own step() call. The
        optimizers' math is per element, so this is bit-identical to one step over the widened gradient."""
        names = list(self.theta)
        sizes = [self.theta[n].size for n in names]
        cap = max(min(WIDEN_CHUNK, sum(sizes)), max(sizes))
        if self._widen_buf is None or self._widen_buf.size < cap:
            self._widen_buf = np.empty(cap, np.float32)
        i = 0
        while i < len(names):
            used, batch = 0, []
            while i < len(names) and (not batch or used + sizes[i] <= self._widen_buf.size):
                x = grads[names[i]]
                if isinstance(x, Encoded):
                    t = _tensor(decode_wire(x, self._widen_buf[used:used + sizes[i]].reshape(x.shape)))
                    used += sizes[i]
                    if scale != 1.0:
                        t.mul_(scale)
                else:   # (a parameter of another dtype, sent as it is)
                    t = _tensor(np.asarray(x))
                    if scale != 1.0:
                        t = torch.mul(t, scale)
                batch.append((self._params[i], t))
                i += 1
            try:
                for p, t in batch:
                    p.grad = t
                self._opt.step()
            finally:   # no gradient left pointing into the reused buffer
                for p, _ in batch:
                    p.grad = None

    def accumulate(self, total: Mapping[str, np.ndarray] | None, g: Mapping[str, np.ndarray]) -> Mapping:
        """A sync step's running sum: `total + g` (`total` None: g itself, not copied). The sum lives in one
        theta-shaped buffer allocated at the first step and reused by every step after it (torch adds, on
        the server's threads), so a step of N gradients costs N - 1 passes and no allocation."""
        if total is None:
            return g
        if total is not self._sum:   # total is a gradient as it came: total + g into the buffer
            if self._sum is None:
                self._sum = {n: np.empty_like(t) for n, t in self.theta.items()}
            for n in self.theta:
                torch.add(_tensor(np.asarray(total[n])), _tensor(np.asarray(g[n])), out=_tensor(self._sum[n]))
            return self._sum
        torch._foreach_add_([_tensor(total[n]) for n in self.theta], [_tensor(np.asarray(g[n])) for n in self.theta])
        return total

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot(self, wire: str = "fp32") -> tuple[int, dict]:
        """(version, theta) for a reply: read-only views that never change. Pass the send's
        MessageTracker to `track(version, tracker, wire)`; an untracked snapshot is never recycled.
        With wire "bf16" / "fp16" the values are `Encoded` 16-bit copies, made once per version."""
        if wire == "fp32":
            self._live.leases += 1
            return self.version, _readonly(self.theta)
        if wire not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {wire!r}; choose one of {', '.join(WIRE_DTYPES)}")
        buf = self._wire.get(wire)
        if buf is None or buf.version != self.version:
            if buf is not None:
                self._wire_frozen.append((wire, buf))
            self._recycle()
            free = self._wire_free.setdefault(wire, [])
            reuse = free.pop() if free else None
            if reuse is None:
                self.allocations += 1
            arrays = {n: self._narrow(t, wire, reuse[n] if reuse else None) for n, t in self.theta.items()}
            buf = self._wire[wire] = _Buffer(arrays, self.version)
        buf.leases += 1
        return self.version, {n: Encoded(_readonly({n: e.bits})[n], e.wire) if isinstance(e, Encoded)
                              else _readonly({n: e})[n] for n, e in buf.arrays.items()}

    @staticmethod
    def _narrow(t: np.ndarray, wire: str, out: np.ndarray | None):
        """theta tensor -> its wire copy: float32 narrowed to 16 bits, other dtypes copied as they are."""
        if t.dtype == np.float32:
            return encode_wire(t, wire, out=out)
        if out is None:
            return t.copy()
        np.copyto(out, t)
        return out

    def track(self, version: int, tracker, wire: str = "fp32") -> None:
        """The snapshot of `version` handed out by `snapshot()` is being sent; `tracker.done` says
        when ZeroMQ no longer reads it (pyzmq's MessageTracker). Unknown versions are ignored."""
        buf = self._buffer(version, wire)
        if buf is not None and buf.leases:
            buf.leases -= 1
            buf.trackers.append((tracker, time.monotonic()))

    def _buffer(self, version: int, wire: str) -> _Buffer | None:
        if wire == "fp32":
            for b in [self._live] + self._frozen:
                if b.version == version:
                    return b
            return None
        cur = self._wire.get(wire)
        if cur is not None and cur.version == version:
            return cur
        return next((b for w, b in self._wire_frozen if w == wire and b.version == version), None)

    def _writable(self, copy: bool = True) -> dict | None:
        """Before theta changes: if anyone may still read the live buffer, move theta to another buffer (copy
        on write; `copy=False`: the caller fills the new buffer itself). Returns the old arrays when theta
        moved, else None."""
        self._recycle()
        if not self._live.busy():
            return None
        if self.spares == 0 and not self._live.leases:   # no spare buffer: wait for the sends instead
            self.waited_s += self._live.wait(self.stall_s)
            if not self._live.busy():
                return None
        arrays = self._spare()
        old = self.theta
        if copy:
            for n, t in old.items():
                np.copyto(arrays[n], t)
            self.copies += 1
        if self._live.leases == 0:      # tracked: it comes back to the pool when its sends are done
            self._frozen.append(self._live)
        self._live = _Buffer(arrays, self.version)
        self.theta = arrays
        for p, a in zip(self._params, arrays.values()):
            p.set_(torch.from_numpy(a))
        return old

    def _spare(self) -> dict:
        """A theta-shaped buffer to move theta into. At most `spares` buffers are held by sends in flight
        (frozen) or kept free: when all are taken, the update waits for the oldest send to finish (ZeroMQ's
        I/O thread is copying it out at memory speed), except that a buffer sent for over `stall_s` (a slow or
        stalled reader) is not waited for and no longer counts. So memory is theta + optimizer state +
        `spares` buffers + one per stalled reader (at most one PARAMS per worker is ever in flight)."""
        if self._free:
            return self._free.pop()
        while self.spares:
            young = [b for b in self._frozen if not b.stalled(time.monotonic(), self.stall_s)]
            if len(young) < self.spares:
                break
            self.waited_s += young[0].wait(self.stall_s)
            self._recycle()
            if self._free:
                return self._free.pop()
        self.allocations += 1
        self.over_cap += len(self._frozen) >= self.spares
        return {n: np.empty_like(t) for n, t in self.theta.items()}

    def _recycle(self) -> None:
        still, done = [], []
        for b in self._frozen:
            (still if b.busy() else done).append(b)
        self._frozen = still
        for b in done:   # frozen + free never exceed the cap
            if len(self._free) + len(still) < self.spares:
                self._free.append(b.arrays)
        wstill = []
        for w, b in self._wire_frozen:
            if b.leases:    # handed out untracked: never reused
                continue
            if b.busy():
                wstill.append((w, b))
            elif len(self._wire_free.setdefault(w, [])) < POOL_KEEP:
                self._wire_free[w].append({n: e.bits if isinstance(e, Encoded) else e for n, e in b.arrays.items()})
        self._wire_frozen = wstill

    def in_flight(self) -> int:
        """Snapshot buffers (theta-sized, fp32 or 16-bit) that sends still read, the live one included."""
        self._recycle()
        return (self._live.busy() if self._live else 0) + len(self._frozen) + len(self._wire_frozen)

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


def _add(out: torch.Tensor, src: torch.Tensor, g: torch.Tensor, alpha: float) -> None:
    """out = src + alpha * g (out may be src). A 16-bit g goes in slices of MIXED_SLICE values: torch widens a
    mixed-dtype operand into a float32 temporary of its size, which stays a reused heap buffer up to 4 MB (a
    whole 10M-value tensor's took a fresh mmap per push: 13.7 ms against 2.4 ms sliced)."""
    if g.dtype == out.dtype or g.numel() <= MIXED_SLICE:
        torch.add(src, g, alpha=alpha, out=out)
        return
    o, s, x = out.view(-1), src.view(-1), g.reshape(-1)
    for i in range(0, o.numel(), MIXED_SLICE):
        torch.add(s[i:i + MIXED_SLICE], x[i:i + MIXED_SLICE], alpha=alpha, out=o[i:i + MIXED_SLICE])


def _grad(g) -> torch.Tensor:
    """A torch view of a gradient: a numpy array, or 16-bit wire values (bfloat16 / float16)."""
    return g.as_torch() if isinstance(g, Encoded) else _tensor(np.asarray(g))


def _finite(g) -> bool:
    """All values finite and within +-MAX_GRADIENT? One read-only pass without a temporary: the smallest and
    the largest value are within the bounds exactly when every value is (NaN propagates into both and fails
    every comparison; +Inf shows in the largest, -Inf in the smallest)."""
    if not isinstance(g, Encoded) and g.size < 1 << 16:   # below 64K values a call's overhead dominates
        return within_bounds(g)
    # torch's min+max is one vectorized pass on the server's threads, faster than a sum (which also had to be
    # re-checked on overflow): 0.9 ms for 16 x 625K floats on 2 threads against 1.4 ms for torch.sum and 1.8 ms
    # for numpy's; 16-bit wire values are read as they are
    return within_bounds(_grad(g))
