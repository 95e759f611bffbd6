"""Moving theta into the model and gradients out of it, without a model-size allocation per step.

On a GPU, theta and gradients pass through page-locked (pinned) host buffers allocated once and
reused every step, with non-blocking copies: pulled theta is copied from the received frames into
the pinned buffer, then to the device; gradients are copied from the device into the pinned buffer
(converted to the wire dtype on the device first), and the push sends that buffer zero-copy. On a
CPU the received frames are copied straight into the parameters (widening bf16/fp16 on the way)
and the gradients go out as views of `.grad` (fp32) or through one reused 16-bit buffer.

Usage::

    io = Transfer(job.model, device, wire="bf16")
    io.load(client.pull(raw=True).tensors)     # theta -> model
    client.push(io.grads(), version=..., clock=...)
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

from common.protocol import Encoded

_TORCH_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _host_view(t: torch.Tensor) -> torch.Tensor:
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


class Transfer:
    def __init__(self, model: torch.nn.Module, device: str | torch.device, wire: str = "fp32"):
        self.model, self.device, self.wire = model, torch.device(device), wire
        self.cuda = self.device.type == "cuda"
        self.params = dict(model.named_parameters())
        self._in: dict[str, torch.Tensor] = {}     # pinned host buffers for theta (cuda)
        self._out: dict[str, torch.Tensor] = {}    # host buffers for gradients (pinned on cuda)
        self._dev16: dict[str, torch.Tensor] = {}  # device buffers for 16-bit gradients (cuda)
        self._dev16in: dict[str, torch.Tensor] = {}  # device buffers for 16-bit theta (cuda)
        self._loaded = None                        # cuda event: the last host->device copies are done
        self.allocations = 0                       # model-size buffers allocated (once each)

    def _buffer(self, store: dict, name: str, like: torch.Tensor, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        buf = store.get(name)
        if buf is None or buf.dtype != dtype:   # (a pull over the socket in bf16, the next through shm in fp32)
            buf = torch.empty(like.shape, dtype=dtype, device=device,
                              pin_memory=self.cuda and str(device) == "cpu")
            store[name] = buf
            self.allocations += 1
        return buf

    @torch.no_grad()
    def load(self, tensors: Mapping) -> None:
        """Copy theta (numpy arrays or `Encoded` values, by name) into the model's parameters."""
        if self.cuda and self._loaded is not None:
            self._loaded.synchronize()   # the previous copies out of the pinned buffers are done
        for name, p in self.params.items():
            src = _host_view(tensors[name])
            if not self.cuda:
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
        if self.cuda:
            self._loaded = torch.cuda.Event()
            self._loaded.record()

    @torch.no_grad()
    def grads(self) -> dict:
        """The model's gradients, ready to push (valid until the next call)."""
        out = {}
        for name, p in self.params.items():
            # only float32 parameters travel in 16 bits (the server keeps them in float32)
            enc = self.wire if self.wire != "fp32" and p.dtype == torch.float32 else None
            dtype = _TORCH_WIRE[enc] if enc else p.dtype
            g = p.grad
            if g is None:   # a parameter the loss did not reach: its gradient is zero
                g = p.grad = torch.zeros_like(p)
            if self.cuda:
                if g.dtype != dtype:
                    g = self._buffer(self._dev16, name, p, dtype, device=p.device).copy_(g)
                host = self._buffer(self._out, name, p, dtype)
                host.copy_(g, non_blocking=True)
            elif g.dtype == dtype:
                host = g.detach()        # no copy: the push sends .grad itself
            else:
                host = self._buffer(self._out, name, p, dtype).copy_(g)
            out[name] = _numpy(host, enc)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return out
