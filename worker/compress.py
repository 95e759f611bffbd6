"""Compressed pushes with error feedback: `--compress int8`.

A push sends C(g + e) instead of g, where C is the 8-bit blockwise absmax format of common/int8.py
and e is this worker's residual, one float32 tensor per parameter (allocated once, on the
parameter's device, zero at the start); after the push e = (g + e) - D(C(g + e)), D the
dequantization the server applies (the same arithmetic, so the same values bit for bit). What
rounding leaves out of one push is added to the next one, so over many pushes the sum of what was
sent differs from the sum of the true gradients by one push's rounding error at most (the last
residual), instead of an error that grows with the number of pushes (1-bit Adam, DGC, PowerSGD's
error feedback). With --local-steps the compressed value is the pseudo-gradient.

The residual assumes every push is delivered: a push the server drops (a backup worker's late
gradient, a spent --max-gradients budget) loses what it carried, as an uncompressed one would. It
lives in the worker process: a restarted worker starts from e = 0.

Usage (worker/transfer.py ParamIO does this for every float32 parameter)::

    ef = ErrorFeedback()
    q, s = ef.compress("w", grad)        # int8 values (grad's shape) and float32 scales, on grad's device
"""
from __future__ import annotations

import torch

from common.int8 import Int8Blocks, dequantize, n_blocks, quantize_

COMPRESSIONS = ("none", "int8")


class ErrorFeedback:
    """int8 compression with a residual per parameter name (see the module docstring). The q and s returned
    are this object's buffers: valid until the next compress() of the same name."""

    def __init__(self):
        self.residual: dict[str, torch.Tensor] = {}
        self.q: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self._work: dict[torch.device, torch.Tensor] = {}   # one scratch buffer per device, the largest size
        self.allocations = 0

    def _buffers(self, name: str, g: torch.Tensor):
        e = self.residual.get(name)
        if e is None or e.shape != g.shape or e.device != g.device:
            e = self.residual[name] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            self.q[name] = torch.empty(g.shape, dtype=torch.int8, device=g.device)
            self.scales[name] = torch.empty(n_blocks(g.numel()), dtype=torch.float32, device=g.device)
            self.allocations += 1
        work = self._work.get(g.device)
        if work is None or work.numel() < g.numel():
            work = self._work[g.device] = torch.empty(g.numel(), dtype=torch.float32, device=g.device)
            self.allocations += 1
        return e, self.q[name], self.scales[name], work

    @torch.no_grad()
    def compress(self, name: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scales) = C(g + e) for parameter `name`; e becomes (g + e) - D(q, scales)."""
        e, q, s, work = self._buffers(name, g)
        flat = e.view(-1)
        flat.add_(g.reshape(-1))                     # e = g + e
        quantize_(flat, q.view(-1), s, work)
        sent = work[:flat.numel()]
        dequantize(q.view(-1), s, 0, sent)            # what the server will apply
        flat.sub_(sent)                              # the residual: what rounding left out
        return q, s

    def blocks(self, name: str, g: torch.Tensor) -> Int8Blocks:
        """compress() for a CPU tensor, as the Int8Blocks a push sends (views of this object's buffers)."""
        q, s = self.compress(name, g)
        return Int8Blocks(q.numpy(), s.numpy())
