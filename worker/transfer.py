"""Moving θ into a model and gradients out of it, by name, without a model-size allocation per step.

`ParamIO` is the one class that does it, for the worker loop (worker/train.py), `--entry` jobs
(worker/entry.py) and the PyTorch API (worker/api.py `DistributedOptimizer`). Parameters may sit
on several devices (CPU and one or more GPUs); each goes its own way:

* CPU: the received frames are copied straight into the parameter (16-bit wire values, `Encoded`,
  are widened by the copy); gradients go out as views of `.grad` (fp32 wire) or through one reused
  16-bit buffer per parameter.
* CUDA: θ and gradients pass through page-locked (pinned) host buffers allocated once and reused,
  with non-blocking copies. 16-bit θ is staged as it came and widened on the device (from a device
  buffer of its own); gradients are narrowed to the wire dtype on the device, then copied to the
  pinned buffer that the push sends zero-copy. A buffer is reallocated only when the dtype it
  holds changes (a pull over the socket in bf16, the next through shared memory in fp32). One CUDA
  event per device is recorded per load; the next load waits on them before reusing the buffers.
* `compress="int8"` (--compress): float32 gradients go out as 8-bit blocks with error feedback
  (worker/compress.py), quantized on the parameter's device; on CUDA only the int8 values and the
  scales cross to the pinned host buffers.

Usage::

    io = ParamIO(model, wire="bf16")
    io.load(client.pull(raw=True).tensors)     # θ -> model
    client.push(io.grads(), version=..., clock=...)
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import numpy as np
import torch

from common.int8 import Int8Blocks
from common.protocol import Encoded
from worker.compress import COMPRESSIONS, ErrorFeedback

_TORCH_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _host_view(t) -> torch.Tensor:
    """A torch view of a received tensor (a numpy array, possibly read-only, or `Encoded` bits)."""
    if isinstance(t, Encoded):
        return t.as_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # read-only frames: we only read them
        return torch.from_numpy(np.asarray(t))


def _numpy(t: torch.Tensor, enc: str | None):
    """A host tensor as what the push sends: a numpy view, or `Encoded` 16-bit values of a float32 tensor."""
    if enc == "bf16":
        return Encoded(t.view(torch.int16).numpy().view(np.uint16), "bf16")
    if enc == "fp16":
        return Encoded(t.numpy(), "fp16")
    return t.numpy()


class ParamIO:
    """θ (numpy arrays or `Encoded` values, by name) into a model's parameters; gradients out, by name.

    `params` is a module or its `named_parameters()`; `wire` is how float32 gradients go out (fp32,
    or bf16 / fp16 narrowed here, on the parameter's device). Parameters must be float32, float16
    or float64 (ValueError otherwise, naming the parameter).
    """

    def __init__(self, params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], wire: str = "fp32",
                 compress: str = "none"):
        if wire not in _TORCH_WIRE:
            raise ValueError(f"unknown wire dtype {wire!r}; choose one of {', '.join(_TORCH_WIRE)}")
        if compress not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compress!r}; choose one of {', '.join(COMPRESSIONS)}")
        self.compressor = ErrorFeedback() if compress == "int8" else None   # its residuals: allocated once
        named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
        self.params: dict[str, torch.nn.Parameter] = dict(named)
        self.wire = wire
        if not self.params:
            raise ValueError("the model has no parameters to train")
        for name, p in self.params.items():
            if p.dtype == torch.bfloat16 or p.is_complex():
                raise ValueError(f"parameter {name!r} is {p.dtype}: keep parameters in float32/float16/float64 "
                                 "(use torch.autocast for mixed precision)")
        self.devices = sorted({p.device for p in self.params.values() if p.is_cuda}, key=str)
        self.cuda = bool(self.devices)
        self._in: dict[str, torch.Tensor] = {}       # pinned host buffers for θ (cuda)
        self._out: dict[str, torch.Tensor] = {}      # host buffers for gradients (pinned on cuda)
        self._dev16: dict[str, torch.Tensor] = {}    # device buffers for 16-bit gradients (cuda)
        self._dev16in: dict[str, torch.Tensor] = {}  # device buffers for 16-bit θ (cuda)
        self._loaded: list = []                      # cuda events: the last load's host -> device copies
        self.allocations = 0                         # model-size buffers allocated (once each)

    def numpy_params(self) -> dict[str, np.ndarray]:
        """A copy of the parameters as numpy arrays (what REGISTER sends)."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}

    def _buffer(self, store: dict, name: str, like: torch.Tensor, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        buf = store.get(name)
        if buf is None or buf.dtype != dtype:   # (a pull over the socket in bf16, the next through shm in fp32)
            pinned = self.cuda and torch.device(device).type == "cpu"   # staging for a GPU: page-locked
            buf = torch.empty(like.shape, dtype=dtype, device=device, pin_memory=pinned)
            store[name] = buf
            self.allocations += 1
        return buf

    @torch.no_grad()
    def load(self, tensors: Mapping) -> None:
        """Copy θ (numpy arrays, possibly read-only views of received frames, or `Encoded`) into the parameters."""
        missing = set(self.params) - set(tensors)
        if missing:
            raise KeyError(f"the server's θ has no {sorted(missing)}: is the server running another model?")
        for event in self._loaded:   # the pinned buffers may still be read by the last load's copies
            event.synchronize()
        for name, p in self.params.items():
            src = _host_view(tensors[name])
            if not p.is_cuda:
                p.copy_(src)       # widens bf16/fp16 on the way
                continue
            staged = self._buffer(self._in, name, p, src.dtype)
            staged.copy_(src)
            if staged.dtype == p.dtype:
                p.copy_(staged, non_blocking=True)
            else:   # 16-bit values: to a device buffer of their own (a cross-device copy that also converts
                # would make a temporary each time), then widened on the device, in stream order
                dev = self._buffer(self._dev16in, name, p, staged.dtype, device=p.device)
                dev.copy_(staged, non_blocking=True)
                p.copy_(dev)
        self._loaded = []
        for device in self.devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._loaded.append(event)

    @torch.no_grad()
    def grads(self, grads: Mapping[str, torch.Tensor | None] | None = None) -> dict:
        """The gradients, ready to push (valid until the next call): by default the parameters' `.grad`
        (a parameter without one gets a zero `.grad`), else `grads` by name (zeros for a missing one)."""
        out = {}
        for name, p in self.params.items():
            # only float32 parameters travel in 16 bits (the server keeps them in float32)
            enc = self.wire if self.wire != "fp32" and p.dtype == torch.float32 else None
            dtype = _TORCH_WIRE[enc] if enc else p.dtype
            if grads is None:
                g = p.grad
                if g is None:   # a parameter the loss did not reach: its gradient is zero
                    g = p.grad = torch.zeros_like(p)
            else:
                g = grads.get(name)
                if g is None:
                    g = torch.zeros_like(p)
            g = g.detach()
            if self.compressor is not None and p.dtype == torch.float32:
                out[name] = self._compressed(name, p, g)
                continue
            if p.is_cuda:
                if g.dtype != dtype:
                    g = self._buffer(self._dev16, name, p, dtype, device=p.device).copy_(g)
                host = self._buffer(self._out, name, p, dtype)
                host.copy_(g, non_blocking=True)
            elif g.dtype == dtype:
                host = g.contiguous()    # no copy: the push sends .grad itself
            else:
                host = self._buffer(self._out, name, p, dtype).copy_(g)
            out[name] = _numpy(host, enc)
        for device in self.devices:
            torch.cuda.current_stream(device).synchronize()
        return out

    def _compressed(self, name: str, p: torch.Tensor, g: torch.Tensor) -> Int8Blocks:
        """C(g + e) with error feedback, as the push sends it (on CUDA: copied to pinned host buffers)."""
        if not p.is_cuda:
            return self.compressor.blocks(name, g)
        q, s = self.compressor.compress(name, g)
        host_q = self._buffer(self._out, name, q, torch.int8)
        host_s = self._buffer(self._out, name + "\0scales", s, torch.float32)
        host_q.copy_(q, non_blocking=True)
        host_s.copy_(s, non_blocking=True)
        return Int8Blocks(host_q.numpy(), host_s.numpy())
