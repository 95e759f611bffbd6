"""GPU workers: theta host->device and gradients device->host through pinned buffers, non-blocking.

With a CUDA device, copying from pageable numpy memory makes every transfer synchronous and staged
by the driver. PinnedIO keeps one page-locked host buffer per parameter (allocated once):

* `load(theta)`: numpy theta -> the pinned buffers (a host memcpy) -> the parameters with
  `non_blocking=True`, all on one side stream so the copies queue back to back; the compute stream
  waits for that stream (an event), not the host.
* `grads()`: every gradient is copied device->host into its pinned buffer with `non_blocking=True`
  on the side stream, then one synchronize of that stream; the returned numpy arrays are views of
  the pinned buffers (two sets used in turn, so one push may still be reading the previous set).

Without CUDA (or `pin=False`) the same calls do plain copies, so the worker loop is the same code.
Not measured in this version: no GPU was available while writing it.

Usage::

    io = PinnedIO(job.model)          # once, after the model is on its device
    io.load(params.tensors); loss.backward(); grads = io.grads()
"""
from __future__ import annotations

import warnings

import numpy as np
import torch


class PinnedIO:
    def __init__(self, model: torch.nn.Module, pin: bool | None = None):
        self.params = dict(model.named_parameters())
        first = next(iter(self.params.values()))
        self.device = first.device
        self.pin = (self.device.type == "cuda") if pin is None else pin
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host_theta = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=self.pin) for n, p in self.params.items()}
        # two sets: with --overlap a push may still read the last gradient while the next one is copied out
        self._grad_sets = [{n: torch.empty(p.shape, dtype=p.dtype, pin_memory=self.pin)
                            for n, p in self.params.items()} for _ in range(2)]
        self._turn = 0

    def load(self, theta) -> None:
        """Copy theta (numpy by name, possibly read-only views) into the parameters."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # read-only numpy source: copied at once
            for n, buf in self.host_theta.items():
                buf.copy_(torch.from_numpy(np.asarray(theta[n])))
            if self.stream is None:
                for n, p in self.params.items():
                    p.copy_(self.host_theta[n])
                return
            # the side stream must not overwrite parameters the compute stream still reads
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for n, p in self.params.items():
                    p.copy_(self.host_theta[n], non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def grads(self) -> dict[str, np.ndarray]:
        """The parameters' gradients as numpy arrays (zeros where a parameter got none), valid until the
        call after next."""
        self.host_grads = self._grad_sets[self._turn]
        self._turn ^= 1
        with torch.no_grad():
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))   # backward has finished
                with torch.cuda.stream(self.stream):
                    for n, p in self.params.items():
                        if p.grad is None:
                            self.host_grads[n].zero_()
                        else:
                            self.host_grads[n].copy_(p.grad, non_blocking=True)
                self.stream.synchronize()
            else:
                for n, p in self.params.items():
                    if p.grad is None:
                        self.host_grads[n].zero_()
                    else:
                        self.host_grads[n].copy_(p.grad)
        return {n: t.numpy() for n, t in self.host_grads.items()}
