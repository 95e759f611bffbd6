"""Local steps (--local-steps H > 1): H steps of the worker's own optimizer between two pushes.

A round, in the words of DiLoCo (Douillard et al. 2023) and local SGD:

    θ_pulled  = the server's θ, loaded into the model (the anchor keeps a float32 copy of it)
    H times:    forward/backward on the next batch; inner.step()     (AdamW by default)
    Δ         = θ_pulled − θ_local                                    (the pseudo-gradient)
    push Δ;     the server's --optimizer applies the mean Δ as the outer step

The sign: Δ points the way a gradient points (uphill), so the server's θ −= lr·mean Δ moves θ towards
the workers' θ_local; with the outer sgd at lr 1 the new θ is exactly the mean of the θ_local
(`tests/test_local.py` pins it). The inner optimizer's state (Adam's moments) is kept across rounds, as
DiLoCo does; a worker process that restarts starts it fresh (the server's θ and outer state are what a
checkpoint keeps).

Usage::

    local = LocalSteps(model, "adamw", lr=3e-3)      # or LocalSteps(model, inner=my_torch_optimizer)
    local.begin()                                    # after θ was loaded into the model
    ... H times: loss.backward(); local.step(); model.zero_grad()
    client.push(io.grads(local.delta()), ...)        # Δ by name, in the model's parameters' buffers
"""
from __future__ import annotations

from typing import Mapping

import torch

INNER = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def inner_optimizer(params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The worker's own optimizer for --local-steps > 1 (--inner-optimizer, --inner-lr, --inner-weight-decay)."""
    if name not in INNER:
        raise ValueError(f"unknown --inner-optimizer {name!r}; choose one of {', '.join(INNER)}")
    return INNER[name](params, lr=lr, weight_decay=weight_decay)


class LocalSteps:
    """The anchor θ_pulled, the inner optimizer, and Δ = θ_pulled − θ_local, for the parameters of `model`
    (or a `named_parameters()` mapping), on their own devices, allocated once."""

    def __init__(self, params: torch.nn.Module | Mapping[str, torch.nn.Parameter], optimizer: str = "adamw",
                 lr: float = 0.003, weight_decay: float = 0.0, inner: torch.optim.Optimizer | None = None):
        named = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else dict(params)
        self.params: dict[str, torch.nn.Parameter] = named
        self.inner = inner if inner is not None else inner_optimizer(list(named.values()), optimizer, lr,
                                                                     weight_decay)
        self._anchor = {n: torch.empty_like(p, dtype=torch.float32) for n, p in named.items()}
        self._delta = {n: torch.empty_like(p) for n, p in named.items()}
        self.steps = 0          # inner steps since begin()
        self.rounds = 0         # rounds begun

    @torch.no_grad()
    def begin(self) -> None:
        """A new round: remember θ as pulled (the model holds it now)."""
        for n, p in self.params.items():
            self._anchor[n].copy_(p)
        self.steps = 0
        self.rounds += 1

    def step(self) -> None:
        """One inner optimizer step on the gradients in the parameters' .grad."""
        self.inner.step()
        self.steps += 1

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """Δ = θ_pulled − θ_local by name (reused buffers, valid until the next call)."""
        for n, p in self.params.items():
            torch.sub(self._anchor[n].to(p.dtype), p, out=self._delta[n])
        return self._delta
