"""The update rule, in one place: how the pushed gradients become one change of theta.

    sync        total = g_0 + g_1 + ... + g_{k-1}       the step's k gradients, summed in worker-id order
                theta <- step(theta, grad = scale * total, lr)       scale = 1/k (--aggregate mean), else 1
    ssp, async  total = g                               one gradient, applied as it arrives
                theta <- step(theta, grad = total, lr = lr / N)      N live workers (mean), else lr

`step` is the server's --optimizer. With workers' --local-steps H > 1 the pushed "gradient" is a
pseudo-gradient Δ = θ_pulled − θ_local, and `step` is the outer optimizer (sgd at lr 1: θ becomes the
mean of the workers' θ_local, classic local SGD; nesterov: DiLoCo's outer Nesterov; delayed-nesterov:
see `_delayed_nesterov`). For plain SGD it is theta -= lr * grad, so sync under mean is
θ −= α·(1/k)·Σg: single-process SGD on the union of the workers' batches, bit for bit (the sum's order
never depends on arrival order). Momentum SGD and Adam are torch.optim's own fused steps. ssp/async
scale the learning rate, not the gradient, so that N pushes move theta about as far as one sync step
for Adam too (Adam is invariant to the gradient's scale).

The path, top to bottom:

1. Σ: `Consistency._fold` (paramserver/consistency.py) adds the held gradients in worker-id order with
   `store.accumulate`, that is `UpdateRule.accumulate` below (one reused buffer). ssp/async skip this.
2. 1/N: `step_scales(mode, aggregate, n)` below gives (scale, lr_scale), for both of Consistency's cases.
3. apply: `ParamStore.apply(total, scale, lr_scale)` (paramserver/store.py) first moves theta out of the
   way of a send still reading it (paramserver/snapshots.py), then calls `UpdateRule.apply`, which takes
   one of three paths, each one small method:
     `_sgd_add`       plain SGD: theta += (-lr * scale) * g in one pass (16-bit wire values in slices)
     `_fused_step`    momentum / Adam: torch's fused step on float32 gradients (scale * g where needed)
     `_widened_step`  momentum / Adam with 16-bit wire gradients: widened chunk by chunk, one step() each
     `_delayed_nesterov`  ssp/async outer Nesterov whose momentum moves once every `period` arrivals

Usage::

    rule = UpdateRule("sgd", lr=0.1); rule.build(theta, state={}, opt_steps=0)
    scale, lr_scale = step_scales("sync", "mean", n=2)              # (0.5, 1.0)
    rule.apply(rule.accumulate(g0, g1), scale, lr_scale)            # theta -= 0.1 * 0.5 * (g0 + g1)
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

from common.protocol import Encoded, decode_wire

#: 16-bit gradients are added to theta in slices of this many values (see _add)
MIXED_SLICE = 1 << 20
#: a fused optimizer's 16-bit gradients are widened at most this many values at a time (see _widened_step)
WIDEN_CHUNK = 1 << 22


def step_scales(mode: str, aggregate: str, n: int) -> tuple[float, float]:
    """(scale, lr_scale) of one update under --aggregate mean: sync multiplies the sum of its n gradients by 1/n;
    ssp/async apply one gradient with learning rate lr/n, n the live workers. --aggregate sum: (1, 1)."""
    if aggregate != "mean":
        return 1.0, 1.0
    if mode == "sync":
        return 1.0 / n, 1.0
    return 1.0, 1.0 / max(1, n)


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (read-only arrays too: torch only reads them here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def grad_tensor(g) -> torch.Tensor:
    """A torch view of a gradient: a numpy array, or 16-bit wire values (bfloat16 / float16)."""
    return g.as_torch() if isinstance(g, Encoded) else as_tensor(np.asarray(g))


_warm = False


def warm_up() -> None:
    """Build a torch optimizer once per process, at start-up: the first one imports much of torch
    (seconds; 9 s measured on a loaded 2-core machine), which must not delay the first REGISTER."""
    global _warm
    if not _warm:
        _warm = True
        torch.optim.Adam([torch.zeros(1)], fused=True)
        torch.optim.SGD([torch.zeros(1)], momentum=0.9, fused=True)


class UpdateRule:
    """The server's optimizer over theta: torch views of theta's arrays, the torch optimizer and its state
    (allocated once, at the first step), and the buffers a step reuses (the sync sum, scale * g, widened
    16-bit values). The results are `torch.optim`'s own."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, period: int = 1):
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.period = max(1, period)   # delayed-nesterov: arrivals per momentum update (the job's workers)
        self._delayed: dict[str, list[torch.Tensor]] | None = None   # delayed-nesterov: momentum, pending sum
        self._arrivals = 0             # delayed-nesterov: Δs applied since the start (a checkpoint's opt_steps)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []   # torch views of theta, in theta's order
        self.opt: torch.optim.Optimizer | None = None
        self._scratch: list[torch.Tensor] | None = None   # scale * g, allocated once when needed
        self.widen_buf: np.ndarray | None = None   # 16-bit gradients widened for a fused optimizer
        self._sum: dict[str, np.ndarray] | None = None     # sync: the step's gradient sum, allocated once

    def build(self, theta: dict[str, np.ndarray], state: Mapping, opt_steps: int) -> None:
        """Step `theta` (its arrays, updated in place) from now on, with the optimizer slots of `state` (a
        checkpoint's {name: {slot: array}}; Adam's t is `opt_steps`)."""
        self.names = list(theta)
        self.params = [as_tensor(a) for a in theta.values()]
        self._scratch = self._sum = self.widen_buf = None
        fused = all(p.dtype in (torch.float32, torch.float64) for p in self.params)
        if self.optimizer == "adam":
            self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                                        fused=fused or None)
        elif self.optimizer in ("momentum", "nesterov"):
            self.opt = torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum, fused=fused or None,
                                       nesterov=self.optimizer == "nesterov")
        else:
            self.opt = None
        if self.optimizer == "delayed-nesterov":
            self._delayed = {"momentum": [torch.zeros_like(p) for p in self.params],
                             "pending": [torch.zeros_like(p) for p in self.params]}
            self._arrivals = opt_steps
            for i, name in enumerate(theta):
                for key in ("momentum", "pending"):
                    if key in state.get(name, {}):
                        self._delayed[key][i].copy_(torch.from_numpy(np.asarray(state[name][key])))
        for name, p in zip(theta, self.params):   # restored optimizer slots (a checkpoint)
            slots = state.get(name)
            if not slots or self.opt is None:
                continue

            def slot(key):
                return torch.from_numpy(np.array(slots[key], dtype=theta[name].dtype))
            if self.optimizer == "adam" and "exp_avg" in slots:
                step = torch.tensor(float(opt_steps), dtype=torch.float32 if fused else torch.get_default_dtype())
                self.opt.state[p] = {"step": step, "exp_avg": slot("exp_avg"), "exp_avg_sq": slot("exp_avg_sq")}
            elif self.optimizer in ("momentum", "nesterov") and "momentum" in slots:
                self.opt.state[p] = {"momentum_buffer": slot("momentum")}

    def rebind(self, theta: dict[str, np.ndarray]) -> None:
        """theta moved to other arrays (copy on write): step those from now on, optimizer state unchanged."""
        for p, a in zip(self.params, theta.values()):
            p.set_(torch.from_numpy(a))

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer slots per parameter as numpy arrays (views of the optimizer's own tensors)."""
        if self._delayed is not None:
            return {name: {"momentum": m.numpy(), "pending": b.numpy()}
                    for name, m, b in zip(self.names, self._delayed["momentum"], self._delayed["pending"])}
        if self.opt is None:
            return {}
        out = {}
        for name, p in zip(self.names, self.params):
            s = self.opt.state.get(p, {})
            if "exp_avg" in s:
                out[name] = {"exp_avg": s["exp_avg"].numpy(), "exp_avg_sq": s["exp_avg_sq"].numpy()}
            elif s.get("momentum_buffer") is not None:
                out[name] = {"momentum": s["momentum_buffer"].numpy()}
        return out

    # -- Σ, then the step ------------------------------------------------------------------------

    def accumulate(self, total: Mapping[str, np.ndarray] | None, g: Mapping[str, np.ndarray]) -> Mapping:
        """A sync step's running sum: `total + g` (`total` None: g itself, not copied). The sum lives in one
        theta-shaped buffer allocated at the first step and reused by every step after it (torch adds, on
        the server's threads), so a step of N gradients costs N - 1 passes and no allocation."""
        if total is None:
            return g
        if total is not self._sum:   # total is a gradient as it came: total + g into the buffer
            if self._sum is None:
                self._sum = {n: np.empty_like(p.numpy()) for n, p in zip(self.names, self.params)}
            for n in self.names:
                torch.add(as_tensor(np.asarray(total[n])), as_tensor(np.asarray(g[n])), out=as_tensor(self._sum[n]))
            return self._sum
        torch._foreach_add_([as_tensor(total[n]) for n in self.names],
                            [as_tensor(np.asarray(g[n])) for n in self.names])
        return total

    def apply(self, grads: Mapping[str, np.ndarray], scale: float = 1.0, lr_scale: float = 1.0,
              old: Mapping[str, np.ndarray] | None = None) -> None:
        """One optimizer step with gradient `scale * grads` (already checked) and learning rate `lr_scale * lr`.
        `old`: plain SGD only, theta's arrays before it moved to the ones stepped now (see `writes_around`)."""
        lr = self.lr * lr_scale
        if self.optimizer == "sgd":
            self._sgd_add(grads, -lr * scale, old)
        elif self.optimizer == "delayed-nesterov":
            self._delayed_nesterov(grads, scale, lr)
        elif any(isinstance(x, Encoded) for x in grads.values()):
            self._set_lr(lr)
            self._widened_step(grads, scale)
        else:
            self._fused_step(grads, scale, lr)

    @property
    def writes_around(self) -> bool:
        """Does a step read theta from the arrays it moved out of (`old`), so theta need not be copied first?
        Plain SGD does: old + alpha * g is written into the new arrays in the same pass."""
        return self.optimizer == "sgd"

    def _set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _sgd_add(self, grads: Mapping, alpha: float, old: Mapping[str, np.ndarray] | None) -> None:
        """theta += alpha * g: one pass, no temporary. 16-bit wire values (Encoded) are added as they are, slice by
        slice (torch widens each slice exactly as decode_wire would, into a small reused buffer: no float32
        copy of the whole gradient). When theta moved, the result is written into its new arrays (the same pass)."""
        g = [grad_tensor(grads[n]) for n in self.names]
        if old is None and not any(isinstance(x, Encoded) for x in grads.values()):
            torch._foreach_add_(self.params, g, alpha=alpha)
            return
        sources = self.params if old is None else [as_tensor(a) for a in old.values()]
        for p, src, x in zip(self.params, sources, g):
            _add(p, src, x, alpha)

    def _fused_step(self, grads: Mapping, scale: float, lr: float) -> None:
        """torch's fused momentum SGD / Adam, which want float32 gradients: scale * g is formed in place in our
        own sum buffer, else in a scratch buffer (the pushed gradient is never modified)."""
        g = [as_tensor(np.asarray(grads[n])) for n in self.names]
        if scale != 1.0 and grads is self._sum:   # our own sum buffer: scaled where it is
            torch._foreach_mul_(g, scale)
        elif scale != 1.0:
            if self._scratch is None:
                self._scratch = [torch.empty_like(p) for p in self.params]
            for s, x in zip(self._scratch, g):
                torch.mul(x, scale, out=s)
            g = self._scratch
        for p, x in zip(self.params, g):
            p.grad = x
        self._set_lr(lr)
        self.opt.step()
        for p in self.params:
            p.grad = None

    def _delayed_nesterov(self, grads: Mapping, scale: float, lr: float) -> None:
        """Delayed Nesterov (Liu et al. 2024, asynchronous local SGD), for Δs applied as they arrive:

            every arrival      θ −= lr/N · Δ;   pending += Δ
            every period-th    m = β·m + pending / period;   θ −= lr_outer · β · m;   pending = 0

        (`lr` is already lr_outer/N under --aggregate mean.) Over `period` equal arrivals this is one outer
        Nesterov step with g = mean Δ (torch's: m = β·m + g; θ −= lr·(g + β·m)), but no Δ waits for the others
        and the momentum, which plain async momentum would apply N times per round, moves once per round."""
        g = [grad_tensor(grads[n]).to(torch.float32) for n in self.names]
        if scale != 1.0:
            g = [x * scale for x in g]
        torch._foreach_add_(self.params, g, alpha=-lr)
        torch._foreach_add_(self._delayed["pending"], g)
        self._arrivals += 1
        if self._arrivals % self.period == 0:
            m, pending = self._delayed["momentum"], self._delayed["pending"]
            torch._foreach_mul_(m, self.momentum)
            torch._foreach_add_(m, pending, alpha=1.0 / self.period)
            torch._foreach_add_(self.params, m, alpha=-self.lr * self.momentum)
            torch._foreach_zero_(pending)

    def _widened_step(self, grads: Mapping, scale: float) -> None:
        """The fused optimizer with 16-bit wire gradients (ssp/async: applied as they come), without a float32
        copy of the whole gradient: tensors are widened into one reused buffer of WIDEN_CHUNK values (or of
        the largest tensor), and each batch of tensors that fits it gets its own step() call. The optimizers'
        math is per element, so this is bit-identical to one step over the widened gradient."""
        sizes = [p.numel() for p in self.params]
        cap = max(min(WIDEN_CHUNK, sum(sizes)), max(sizes))
        if self.widen_buf is None or self.widen_buf.size < cap:
            self.widen_buf = np.empty(cap, np.float32)
        i = 0
        while i < len(self.names):
            used, batch = 0, []
            while i < len(self.names) and (not batch or used + sizes[i] <= self.widen_buf.size):
                x = grads[self.names[i]]
                if isinstance(x, Encoded):
                    t = as_tensor(decode_wire(x, self.widen_buf[used:used + sizes[i]].reshape(x.shape)))
                    used += sizes[i]
                    if scale != 1.0:
                        t.mul_(scale)
                else:   # (a parameter of another dtype, sent as it is)
                    t = as_tensor(np.asarray(x))
                    if scale != 1.0:
                        t = torch.mul(t, scale)
                batch.append((self.params[i], t))
                i += 1
            try:
                for p, t in batch:
                    p.grad = t
                self.opt.step()
            finally:   # no gradient left pointing into the reused buffer
                for p, _ in batch:
                    p.grad = None


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
