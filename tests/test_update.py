"""paramserver/update.py: the update rule. sgd / momentum / Adam equal torch.optim step for step, the sync sum
equals numpy's in worker-id order bit for bit, 16-bit wire gradients apply exactly as their float32 values, and
step_scales gives each mode's 1/N."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.protocol import decode_wire, encode_wire
from paramserver.store import ParamStore
from tests.test_snapshots import _addr, _send


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_update_rule_matches_torch(optimizer):
    rng = np.random.default_rng(1)
    theta0 = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    store = ParamStore(optimizer=optimizer, lr=0.05, momentum=0.9)
    store.init(theta0)
    params = [torch.nn.Parameter(torch.from_numpy(theta0[n].copy())) for n in ("a", "b")]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.05),
           "momentum": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9),
           "adam": lambda: torch.optim.Adam(params, lr=0.05)}[optimizer]()
    for step in range(10):
        g = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
        store.apply(g)
        for p, n in zip(params, ("a", "b")):
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
    assert store.version == 10
    for p, n in zip(params, ("a", "b")):
        np.testing.assert_allclose(store.theta[n], p.detach().numpy(), atol=1e-6)


def test_closed_form_push_k_times():
    store = ParamStore("sgd", lr=0.5)
    store.init({"w": np.zeros(3, np.float32)})
    for _ in range(8):
        store.apply({"w": np.ones(3, np.float32)}, scale=0.25)
    np.testing.assert_allclose(store.theta["w"], -0.5 * 0.25 * 8 * np.ones(3))


# -- the torch apply -------------------------------------------------------------------------------


SHAPES = {"w": (7, 5), "b": (5,), "s": (), "e": (0, 3)}


def _grads(rng):
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_many_steps_with_scales_equal_torch_optim(optimizer):
    """300 steps with a changing gradient scale (sync mean) and learning-rate scale (async lr/N) stay
    within 1e-6 of torch.optim fed scale * g at lr * lr_scale."""
    rng = np.random.default_rng(7)
    theta0 = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    store = ParamStore(optimizer=optimizer, lr=0.01, momentum=0.8, beta1=0.85, beta2=0.99, eps=1e-7)
    store.init(theta0)
    params = [torch.nn.Parameter(torch.from_numpy(theta0[n].copy())) for n in SHAPES]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.01),
           "momentum": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.8),
           "adam": lambda: torch.optim.Adam(params, lr=0.01, betas=(0.85, 0.99), eps=1e-7)}[optimizer]()
    for step in range(300):
        g = _grads(rng)
        scale, lr_scale = [1.0, 0.5, 0.25, 1 / 3][step % 4], [1.0, 0.5][step % 2]
        store.apply(g, scale=scale, lr_scale=lr_scale)
        for p, n in zip(params, SHAPES):
            p.grad = torch.from_numpy(np.asarray(g[n] * np.float32(scale)))
        for group in opt.param_groups:
            group["lr"] = 0.01 * lr_scale
        opt.step()
    assert store.version == store.opt_steps == 300
    for p, n in zip(params, SHAPES):
        np.testing.assert_allclose(store.theta[n], p.detach().numpy(), atol=1e-6, rtol=0)


def test_optimizer_state_is_allocated_once_and_theta_updated_in_place():
    store = ParamStore("adam", lr=0.01)
    store.init({"w": np.zeros(1000, np.float32)})
    g = {"w": np.ones(1000, np.float32)}
    store.apply(g)
    slots = {k: v.__array_interface__["data"][0] for k, v in store.state["w"].items()}
    theta_at = store.theta["w"].__array_interface__["data"][0]
    for _ in range(5):
        store.apply(g, scale=0.5)
    assert {k: v.__array_interface__["data"][0] for k, v in store.state["w"].items()} == slots
    assert store.theta["w"].__array_interface__["data"][0] == theta_at   # no snapshot out: no copy
    assert store.copies == 0 and store.allocations == 0


def test_gradient_is_not_modified_by_apply():
    for optimizer in ("sgd", "momentum", "adam"):
        store = ParamStore(optimizer, lr=0.1)
        store.init({"w": np.ones(50, np.float32)})
        g = np.linspace(-1, 1, 50, dtype=np.float32)
        before = g.copy()
        store.apply({"w": g}, scale=0.5)
        store.apply({"w": g})
        np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_sum_buffer_is_reused_and_equals_numpy_in_id_order(optimizer):
    rng = np.random.default_rng(1)
    theta = {"w": rng.standard_normal(3000, dtype=np.float32), "h": rng.standard_normal(5).astype(np.float16)}
    summed, reference = ParamStore(optimizer, lr=0.01), ParamStore(optimizer, lr=0.01)
    summed.init(theta)
    reference.init(theta)
    addresses = set()
    for step in range(4):
        grads = [{n: rng.standard_normal(t.shape).astype(t.dtype) for n, t in theta.items()} for _ in range(3)]
        kept = [{n: a.copy() for n, a in g.items()} for g in grads]
        total = None
        for g in grads:
            total = summed.accumulate(total, g)
        addresses.add(_addr(total["w"]))
        expect = {n: grads[0][n].copy() for n in theta}
        for g in grads[1:]:
            for n in theta:
                expect[n] += g[n]
        assert all(np.array_equal(total[n], expect[n]) for n in theta)     # numpy's sum, bit for bit
        summed.apply(total, scale=1 / 3)
        reference.apply(expect, scale=1 / 3)
        assert all(np.array_equal(grads[i][n], kept[i][n]) for i in range(3) for n in theta)  # inputs untouched
    assert len(addresses) == 1                                                  # one buffer for every step
    assert all(np.array_equal(summed.theta[n], reference.theta[n]) for n in theta)
    assert summed.accumulate(None, grads[0]) is grads[0]                        # a single gradient is not copied


# -- 16-bit wire gradients taken as they are --------------------------------------------------------


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("wire", ["bf16", "fp16"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_16_bit_wire_gradients_apply_exactly_as_their_float32_values(optimizer, wire, sliced, monkeypatch):
    # plain SGD adds the 16-bit values directly (slice by slice, no float32 copy of the gradient), the fused
    # optimizers widen them into one reused buffer, a batch of tensors per step() call: either way theta is
    # bit-identical to applying the widened gradient, also while theta is being sent (the update then writes
    # into another buffer)
    from paramserver import update
    if sliced:
        monkeypatch.setattr(update, "MIXED_SLICE", 1000)   # 120 slices of the 300 x 400 tensor, a ragged last one
        monkeypatch.setattr(update, "WIDEN_CHUNK", 125_000)   # "w", then "v" and "b" together: two step() calls
    rng = np.random.default_rng(7)
    init = {"w": rng.standard_normal((300, 400)).astype(np.float32), "v": rng.standard_normal(9000).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}
    direct, widened = ParamStore(optimizer, lr=0.01), ParamStore(optimizer, lr=0.01)
    direct.init(init)
    widened.init(init)
    for step in range(4):
        g = {n: encode_wire(rng.standard_normal(t.shape).astype(np.float32), wire) for n, t in init.items()}
        direct.check_gradient(g)
        sent = None
        if step % 2:   # a send still reads theta: the update goes out of place, the snapshot does not change
            _, snap, _ = _send(direct)
            sent = {n: (snap[n], snap[n].copy()) for n in snap}
        direct.apply(g, scale=0.5, lr_scale=0.9)
        for n, (live, then) in (sent or {}).items():
            np.testing.assert_array_equal(live, then)
        widened.apply({n: decode_wire(e) for n, e in g.items()}, scale=0.5, lr_scale=0.9)
        for n in init:
            np.testing.assert_array_equal(direct.theta[n], widened.theta[n])
        if optimizer != "sgd":   # the widening buffer holds the largest batch, not the whole gradient
            assert direct._widen_buf.size == (125_000 if sliced else 129_005)


# -- the 1/N and the rule on its own ---------------------------------------------------------------

def test_step_scales_put_the_mean_on_the_sum_in_sync_and_on_the_learning_rate_otherwise():
    from paramserver.update import step_scales
    assert step_scales("sync", "mean", 4) == (0.25, 1.0)          # theta -= lr * (1/4) * sum of 4 gradients
    assert step_scales("ssp", "mean", 4) == (1.0, 0.25)           # each push: theta -= (lr/4) * g
    assert step_scales("async", "mean", 3) == (1.0, 1.0 / 3)
    assert step_scales("async", "mean", 0) == (1.0, 1.0)          # (no live worker: lr as it is)
    for mode in ("sync", "ssp", "async"):
        assert step_scales(mode, "sum", 4) == (1.0, 1.0)


def test_update_rule_alone_is_theta_minus_lr_times_scale_times_the_sum():
    from paramserver.update import UpdateRule, step_scales
    rng = np.random.default_rng(5)
    theta = {"w": rng.standard_normal(1000).astype(np.float32)}
    before = theta["w"].copy()
    g0, g1 = ({"w": rng.standard_normal(1000).astype(np.float32)} for _ in range(2))
    rule = UpdateRule("sgd", lr=0.1)
    rule.build(theta, state={}, opt_steps=0)
    scale, lr_scale = step_scales("sync", "mean", 2)
    rule.apply(rule.accumulate(g0, g1), scale, lr_scale)         # in place, in theta's own arrays
    expect = torch.add(torch.from_numpy(before), torch.from_numpy(g0["w"] + g1["w"]), alpha=-0.1 * 0.5)
    np.testing.assert_array_equal(theta["w"], expect.numpy())
