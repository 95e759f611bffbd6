"""worker/transfer.py ParamIO: theta into the model and gradients out, with buffers reused across steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.protocol import Encoded, Message, MsgType, decode, encode, encode_wire
from worker.transfer import ParamIO

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(device)


def _step(model, device):
    model.zero_grad(set_to_none=False)
    x = torch.randn(8, 6, device=device)
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_load_and_grads_round_trip_without_new_buffers(device, wire):
    model = _model(device)
    io = ParamIO(model, wire)
    rng = np.random.default_rng(0)
    seen = None
    for step in range(4):
        theta = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in model.named_parameters()}
        # theta arrives as the server sends it: decoded from frames, raw (16-bit stays Encoded)
        msg = decode(encode(Message(MsgType.PARAMS, tensors=theta, wire=wire)), raw=True)
        io.load(msg.tensors)
        for n, p in model.named_parameters():
            want = theta[n] if wire == "fp32" else msg.tensors[n].to_float32()
            np.testing.assert_array_equal(p.detach().cpu().numpy(), want)
        _step(model, device)
        grads = io.grads()
        for n, p in model.named_parameters():
            g = p.grad.detach().cpu().numpy()
            if wire == "fp32":
                assert isinstance(grads[n], np.ndarray) and grads[n].dtype == np.float32
                np.testing.assert_array_equal(grads[n], g)
            else:
                assert isinstance(grads[n], Encoded) and grads[n].wire == wire
                np.testing.assert_array_equal(grads[n].bits, encode_wire(g, wire).bits)
        addresses = {n: (g.bits if isinstance(g, Encoded) else g).__array_interface__["data"][0]
                     for n, g in grads.items()}
        if seen is None:
            seen, allocated = addresses, io.allocations
        else:   # the same host buffers every step: no model-size allocation per step
            assert addresses == seen and io.allocations == allocated
    if device == "cpu" and wire == "fp32":
        assert io.allocations == 0     # gradients go out as views of .grad itself
    if device == "cuda":   # host buffers page-locked (non-blocking copies), 16-bit ones kept on the device too
        assert io._in and io._out and all(b.is_pinned() for b in [*io._in.values(), *io._out.values()])
        assert (wire == "fp32") == (not io._dev16in)
