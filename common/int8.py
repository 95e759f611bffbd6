"""8-bit blockwise absmax values of a float32 tensor: the numbers behind the wire encoding "int8".

The tensor is flattened and cut into blocks of BLOCK values; each block travels as one float32 scale
s = max |x| over the block and one int8 per value, q = round(x / s * 127) (so q is in [-127, 127]);
the receiver takes x' = q * (s / 127). The rounding error is at most half a step, |x - x'| <= s / 254
per value (plus float32 rounding of the product). A block of zeros has s = 0 and q = 0.

Why BLOCK = 1024: the scales cost 4 / BLOCK bytes per value, 0.4% here (1.6% at 256), so a push is
1.004 bytes per value, 1.99x fewer than bf16 and 3.98x fewer than fp32 (8 bits plus any scale can
never quite reach 2x of bf16). Smaller blocks follow the gradient's magnitude more closely, but the
rounding error is not lost either way: the worker keeps it and adds it to its next push (error
feedback, worker/compress.py). Measured on one gradient of the default GPT (batch 32): relative RMS
rounding error 0.69% at 256, 0.84% at 1024, 1.13% at 4096; 1.016, 1.004, 1.002 bytes per value.

`phase` says where the values start inside their first block: 0 for a whole tensor; a piece of a
tensor cut off for a shard (common/shards.py) keeps the blocks of the whole tensor, so its first
value may sit `phase` values into a block (its scales are that block's and the following ones).
numpy holds the values; torch (imported when first used) does the arithmetic, vectorised.

Usage::

    blocks = quantize(torch.randn(5000))          # Int8Blocks: .q int8, .scales float32
    x = blocks.to_float32()                       # dequantized, numpy float32
"""
from __future__ import annotations

import warnings

import numpy as np

#: values per block (one float32 scale each)
BLOCK = 1024
_LEVELS = 127.0


def n_blocks(n: int, phase: int = 0) -> int:
    """How many blocks (scales) n values take when they start `phase` values into their first block."""
    return 0 if n == 0 else -(-(phase + n) // BLOCK)


class Int8Blocks:
    """A float32 tensor as int8 values `q` (in the tensor's shape) and one float32 scale per block."""

    __slots__ = ("q", "scales", "phase")
    wire = "int8"

    def __init__(self, q: np.ndarray, scales: np.ndarray, phase: int = 0):
        self.q, self.scales, self.phase = q, scales, phase

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def to_float32(self, out: np.ndarray | None = None) -> np.ndarray:
        """The dequantized values, x' = q * (s / 127), into `out` (float32, the tensor's shape) if given."""
        if out is None:
            out = np.empty(self.q.shape, np.float32)
        dequantize(_view(self.q.reshape(-1)), _view(self.scales), self.phase, _view(out.reshape(-1)))
        return out

    def piece(self, start: int, stop: int) -> "Int8Blocks":
        """Flat values start..stop-1 as a 1-d Int8Blocks (views; the whole tensor's blocks, see `phase`)."""
        first = (self.phase + start) // BLOCK
        return Int8Blocks(self.q.reshape(-1)[start:stop],
                          self.scales[first:first + n_blocks(stop - start, (self.phase + start) % BLOCK)],
                          (self.phase + start) % BLOCK)


def _view(a: np.ndarray):
    import torch
    with warnings.catch_warnings():   # read-only received frames: only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def quantize_(x, q, scales, work) -> None:
    """Quantize flat float32 torch tensor `x` (phase 0) into int8 `q` and float32 `scales` (n_blocks(n)),
    using `work` (float32, at least x's size, same device) for the scaled values: no other allocation of
    x's size."""
    import torch
    n = x.numel()
    if n == 0:
        return
    full = n // BLOCK * BLOCK
    w = work[:n]
    torch.abs(x, out=w)
    if full:
        torch.amax(w[:full].view(-1, BLOCK), dim=1, out=scales[:full // BLOCK])
    if full < n:
        scales[-1] = w[full:].max()
    inv = torch.where(scales > 0, _LEVELS / scales, torch.zeros_like(scales))   # one value per block
    if full:
        torch.mul(x[:full].view(-1, BLOCK), inv[:full // BLOCK, None], out=w[:full].view(-1, BLOCK))
    if full < n:
        torch.mul(x[full:], inv[-1], out=w[full:])
    q.copy_(w.round_())   # |w| <= 127 (x <= s), so no clamp: 127.5 and beyond cannot occur


def dequantize(q, scales, phase: int, out) -> None:
    """out = q * (s / 127) per block, for flat torch tensors; q starts `phase` values into its first block.
    The same arithmetic on every side, so a worker's own dequantized values equal the server's bit for bit."""
    import torch
    n = q.numel()
    if n == 0:
        return
    step = scales / _LEVELS
    head = min(n, BLOCK - phase) if phase else 0
    out.copy_(q)   # exact; then scaled in place (a mixed int8 * float32 product measured 14x slower)
    if head:
        out[:head].mul_(step[0])
    b = 1 if head else 0
    full = (n - head) // BLOCK
    if full:
        out[head:head + full * BLOCK].view(full, BLOCK).mul_(step[b:b + full, None])
    tail = n - head - full * BLOCK
    if tail:
        out[n - tail:].mul_(step[b + full])


def dequantize_part(q: np.ndarray, scales: np.ndarray, start: int, out: np.ndarray) -> int:
    """Dequantize flat int8 values that start `start` values into the blocks of `scales` (numpy arrays, `q` may
    be a read-only received frame) into float32 `out`; returns how many values."""
    dequantize(_view(q), _view(scales[start // BLOCK:]), start % BLOCK, _view(out))
    return q.size


def quantize(x) -> Int8Blocks:
    """A float32 tensor (torch or numpy) as a fresh Int8Blocks (tests, tools; the worker reuses buffers)."""
    import torch
    t = torch.as_tensor(np.asarray(x, np.float32) if not isinstance(x, torch.Tensor) else x).float()
    flat = t.reshape(-1).contiguous()
    q = torch.empty(flat.numel(), dtype=torch.int8)
    s = torch.empty(n_blocks(flat.numel()), dtype=torch.float32)
    quantize_(flat, q, s, torch.empty_like(flat))
    return Int8Blocks(q.numpy().reshape(tuple(t.shape)), s.numpy())


def check_scales(scales: np.ndarray) -> str | None:
    """Why these received scales are unusable (NaN, Inf or negative), or None when they are fine."""
    bad = ~np.isfinite(scales) | (scales < 0)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    return f"scale of block {i} is {float(scales[i])}; scales must be finite and >= 0 ({int(bad.sum())} bad)"


def wire_size(n: int, phase: int = 0) -> int:
    """Bytes n values take as int8 blocks (values and scales)."""
    return n + 4 * n_blocks(n, phase) if n else 0

