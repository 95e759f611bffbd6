"""paramserver/store.py: the update rules match torch.optim step for step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.protocol import MAX_GRADIENT, decode_wire, encode_wire
from paramserver.store import ParamStore


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


def test_snapshot_is_stable_while_theta_changes():
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(2, np.float32)})
    version, snap = store.snapshot()
    store.apply({"w": np.ones(2, np.float32)})
    assert version == 0 and snap["w"].tolist() == [0.0, 0.0]
    assert store.snapshot()[1]["w"].tolist() == [-1.0, -1.0]


def test_check_gradient_names_the_problem():
    store = ParamStore()
    store.init({"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="wrong shape"):
        store.check_gradient({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient({"w": np.array([np.inf, 0], np.float32)})


def test_state_dict_round_trip():
    store = ParamStore("adam", lr=0.1)
    store.init({"w": np.ones(2, np.float32)})
    store.apply({"w": np.ones(2, np.float32)})
    other = ParamStore("adam", lr=0.1)
    other.load_state_dict(store.state_dict())
    store.apply({"w": np.ones(2, np.float32)})
    other.apply({"w": np.ones(2, np.float32)})
    np.testing.assert_array_equal(store.theta["w"], other.theta["w"])
    assert other.version == 2


def test_checksum_follows_every_change_of_theta():
    from paramserver.store import theta_crc32
    store = ParamStore("sgd", lr=1.0)
    empty = store.checksum()
    store.init({"w": np.zeros(2, np.float32)})
    at_init = store.checksum()
    assert at_init != empty and at_init == theta_crc32(store.theta)
    store.apply({"w": np.ones(2, np.float32)})
    assert store.checksum() != at_init and store.checksum() == theta_crc32(store.theta)


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


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_state_dict_round_trip_continues_identically(optimizer):
    rng = np.random.default_rng(3)
    store = ParamStore(optimizer, lr=0.05)
    store.init({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    for _ in range(3):
        store.apply({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    other = ParamStore(optimizer, lr=0.05)
    other.load_state_dict(store.state_dict())
    for _ in range(3):
        g = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
        store.apply(g)
        other.apply(g)
    np.testing.assert_array_equal(store.theta["w"], other.theta["w"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_anywhere_is_rejected(bad):
    store = ParamStore()
    store.init({"w": np.zeros(100_000, np.float32), "h": np.zeros(3, np.float16)})
    for where in (0, 54_321, 99_999):
        g = {"w": np.zeros(100_000, np.float32), "h": np.zeros(3, np.float16)}
        g["w"][where] = bad
        with pytest.raises(ValueError, match="non-finite"):
            store.check_gradient(g)
    g = {"w": np.zeros(100_000, np.float32), "h": np.array([0, bad, 0], np.float16)}
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient(g)
    # values up to +-MAX_GRADIENT are accepted (the check looks at the extremes, not at a sum) ...
    store.check_gradient({"w": np.full(100_000, MAX_GRADIENT, np.float32), "h": np.full(3, 60000, np.float16)})
    store.check_gradient({"w": np.full(100_000, -MAX_GRADIENT, np.float32), "h": np.full(3, -60000, np.float16)})


@pytest.mark.parametrize("size", [10, 100_000])   # numpy's check below 64K values, torch's above
@pytest.mark.parametrize("value", [3e38, -3e38, 2e18])
def test_finite_values_beyond_max_gradient_are_rejected(size, value):
    """... and beyond it refused like NaN, theta untouched: finite values near float32's limit would overflow a
    sync step's sum or Adam's second moment (g^2 > 3.4e38 from |g| > 1.8e19)."""
    store = ParamStore("adam", lr=0.1)
    store.init({"w": np.zeros(size, np.float32)})
    g = np.zeros(size, np.float32)
    g[size // 2] = value
    with pytest.raises(ValueError, match=r"beyond \+-1e\+18"):
        store.check_gradient({"w": g})
    with pytest.raises(ValueError, match="beyond"):   # the same bound for 16-bit wire values
        store.check_gradient({"w": encode_wire(g, "bf16")})
    assert store.version == 0 and not store.theta["w"].any()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_rejected_in_large_tensors_of_every_float_dtype(bad, dtype):
    store = ParamStore()
    store.init({"w": np.zeros((300, 1000), dtype)})
    g = {"w": np.ones((300, 1000), dtype)}
    store.check_gradient(g)
    g["w"][299, 999] = bad
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient(g)


# -- the snapshot pool ---------------------------------------------------------------------------

class FakeTracker:
    """Stands in for pyzmq's MessageTracker: `done` once ZeroMQ has released the frames."""

    def __init__(self):
        self.done = False


def _send(store: ParamStore, wire: str = "fp32") -> tuple[int, dict, FakeTracker]:
    """Hand out a snapshot as the server does for a PARAMS reply: (version, arrays, the send's tracker)."""
    version, snap = store.snapshot(wire)
    tracker = FakeTracker()
    store.track(version, tracker, wire)
    return version, snap, tracker


def _addr(a):
    return a.__array_interface__["data"][0]


def test_pool_never_hands_out_a_buffer_still_being_sent():
    store = ParamStore("momentum", lr=1.0, momentum=0.0)   # in-place optimizers copy theta away first
    store.init({"w": np.zeros(1000, np.float32)})
    g = {"w": np.ones(1000, np.float32)}
    v0, snap0, t0 = _send(store)
    store.apply(g)                                   # snap0 is being sent: theta moves (copy on write)
    assert store.copies == 1 and not np.shares_memory(store.theta["w"], snap0["w"])
    store.apply(g)                                   # nothing out: in place
    assert store.copies == 1
    v2, snap2, t2 = _send(store)
    store.apply(g)                                   # snap0 still in flight: must not be reused
    assert not np.shares_memory(store.theta["w"], snap0["w"])
    assert not np.shares_memory(store.theta["w"], snap2["w"])
    assert (snap0["w"] == 0).all() and (snap2["w"] == -2).all() and v0 == 0 and v2 == 2
    with pytest.raises(ValueError):
        snap0["w"][0] = 1.0                          # snapshots are read-only
    t0.done = True                                   # ZeroMQ let go of snap0's buffer
    v3, snap3, _ = _send(store)
    store.apply(g)                                   # now its buffer is recycled, not a new allocation
    assert _addr(store.theta["w"]) == _addr(snap0["w"])
    assert store.allocations == 2                    # two buffers ever allocated for four versions sent
    assert (snap2["w"] == -2).all() and (snap3["w"] == -3).all() and (store.theta["w"] == -4).all()


def test_sgd_writes_around_a_snapshot_being_sent_with_the_same_bits_and_no_copy():
    rng = np.random.default_rng(0)
    theta = {"w": rng.standard_normal(5000, dtype=np.float32), "b": rng.standard_normal(7, dtype=np.float32)}
    grads = [{n: rng.standard_normal(t.shape, dtype=np.float32) for n, t in theta.items()} for _ in range(6)]
    moved, inplace = ParamStore("sgd", lr=0.37, spares=len(grads)), ParamStore("sgd", lr=0.37)
    moved.init(theta)
    inplace.init(theta)
    sent = []
    for i, g in enumerate(grads):
        v, snap, _ = _send(moved)                # every version is still on the wire when the next comes
        sent.append((snap, {n: a.copy() for n, a in snap.items()}))
        moved.apply(g, scale=0.5, lr_scale=1.5)
        inplace.apply(g, scale=0.5, lr_scale=1.5)
        assert not np.shares_memory(moved.theta["w"], snap["w"])
    assert moved.copies == 0 and moved.allocations == len(grads)    # written around, never copied first
    for n in theta:
        assert np.array_equal(moved.theta[n], inplace.theta[n])      # bit for bit the in-place update
    for snap, then in sent:
        assert all(np.array_equal(snap[n], then[n]) for n in theta)  # no snapshot changed under its send


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


def test_snapshot_buffers_are_capped_an_update_waits_for_a_send_but_never_for_a_stalled_one():
    import threading
    store = ParamStore("adam", lr=0.1, spares=1, stall_s=2.0)
    store.init({"w": np.zeros(1000, np.float32)})
    g = {"w": np.ones(1000, np.float32)}
    v0, snap0, t0 = _send(store)
    store.apply(g)                                   # snap0 on the wire: theta moves to the one spare buffer
    assert store.allocations == 1
    v1, snap1, t1 = _send(store)
    threading.Timer(0.05, lambda: setattr(t0, "done", True)).start()   # the send of snap0 finishes a bit later
    store.apply(g)                                   # no spare left: waits for snap0's send, then reuses it
    assert store.allocations == 1 and store.waited_s > 0
    assert _addr(store.theta["w"]) == _addr(snap0["w"])
    before = snap1["w"].copy()
    stalled_waits = store.waited_s
    v2, snap2, _ = _send(store)                   # never done (a reader that stopped reading), nor is t1
    store.apply(g)                                   # waits for snap1 until it counts as stalled, then allocates
    assert store.allocations == 2 and store.waited_s > stalled_waits
    waited = [store.waited_s]
    for _ in range(4):                               # snap2's stalled buffer is waited for once, until it ages
        v, _snap, t = _send(store)
        store.apply(g)
        t.done = True                                # other readers' sends finish
        waited.append(store.waited_s)
    assert waited[1] > waited[0] and waited[1] == waited[2] == waited[3] == waited[4]   # then never again
    assert np.array_equal(snap1["w"], before)        # nothing in flight was ever overwritten
    assert store.in_flight() == 2                    # the two stalled sends hold their buffers


def test_without_snapshot_buffers_an_update_waits_for_the_send_and_never_copies():
    import threading
    store = ParamStore("adam", lr=0.1, spares=0, stall_s=2.0)
    store.init({"w": np.zeros(1000, np.float32)})
    g = {"w": np.ones(1000, np.float32)}
    v0, snap0, t0 = _send(store)
    threading.Timer(0.05, lambda: setattr(t0, "done", True)).start()
    store.apply(g)                                   # waits for the send, then updates theta in place
    assert store.allocations == 0 and store.copies == 0 and store.waited_s > 0
    assert _addr(store.theta["w"]) == _addr(snap0["w"])
    v1, snap1, _ = _send(store)                   # a reader that stopped reading
    sent = snap1["w"].copy()
    store.apply(g)                                   # not waited for beyond the stall: theta moves
    assert store.allocations == 1 and not np.shares_memory(store.theta["w"], snap1["w"])
    assert np.array_equal(snap1["w"], sent) and not np.array_equal(store.theta["w"], sent)


@pytest.mark.parametrize("spares", [2, 3, 4])
def test_the_buffer_an_update_waited_for_is_reused_whatever_the_cap(spares):
    import threading
    store = ParamStore("adam", lr=0.1, spares=spares, stall_s=5.0)
    store.init({"w": np.zeros(1000, np.float32)})
    g = {"w": np.ones(1000, np.float32)}
    trackers = []
    for i in range(spares + 1):                      # theta + `spares` buffers, every one on the wire
        v, _snap = store.snapshot()
        trackers.append(FakeTracker())
        store.track(v, trackers[-1])
        if i < spares:
            store.apply(g)
    assert store.allocations == spares and store.waited_s == 0
    threading.Timer(0.05, lambda: setattr(trackers[0], "done", True)).start()
    store.apply(g)                                   # waits for the oldest send, then takes its buffer
    assert store.allocations == spares and store.waited_s > 0


def test_untracked_snapshot_is_never_recycled():
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(10, np.float32)})
    _, kept = store.snapshot()                       # e.g. a send that failed: nobody will report it done
    for _ in range(5):
        _, s = store.snapshot()
        store.track(store.version, type("T", (), {"done": True})())
        store.apply({"w": np.ones(10, np.float32)})
    assert (kept["w"] == 0).all()


@pytest.mark.parametrize("wire, rel", [("bf16", 2 ** -8), ("fp16", 2 ** -11)])
def test_wire_snapshot_once_per_version_within_rounding(wire, rel):
    rng = np.random.default_rng(0)
    store = ParamStore("sgd", lr=0.1)
    store.init({"w": rng.standard_normal(1000).astype(np.float32), "d": np.ones(2, np.float64)})
    v, a = store.snapshot(wire)
    _, b = store.snapshot(wire)
    assert np.shares_memory(a["w"].bits, b["w"].bits)          # made once per version
    assert a["d"].dtype == np.float64 and (a["d"] == 1).all()   # only float32 travels narrowed
    w = a["w"].to_float32()
    np.testing.assert_allclose(w, store.theta["w"], rtol=rel, atol=0)
    store.track(v, FakeTracker(), wire)
    store.track(v, FakeTracker(), wire)
    store.apply({"w": np.ones(1000, np.float32), "d": np.ones(2, np.float64)})
    _, c = store.snapshot(wire)
    assert not np.shares_memory(c["w"].bits, a["w"].bits)      # a is still being sent
    np.testing.assert_array_equal(a["w"].to_float32(), w)
    assert store.theta["w"].dtype == np.float32                 # the master copy stays fp32


def test_divergence_is_exact_for_small_models_and_estimated_for_large():
    from paramserver import store as store_mod
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(100, np.float32)})
    _, sample = store.sample()
    store.apply({"w": np.full(100, 0.5, np.float32)})
    assert store.distance(sample) == pytest.approx(5.0)         # sqrt(100 * 0.25), exact
    big = ParamStore("sgd", lr=1.0)
    big.init({"a": np.zeros(store_mod.DIVERGENCE_SAMPLE * 3, np.float32), "b": np.zeros(1001, np.float32)})
    _, sample = big.sample()
    assert sum(s.size for s in sample.values()) <= store_mod.DIVERGENCE_SAMPLE + 2
    big.apply({"a": np.full(store_mod.DIVERGENCE_SAMPLE * 3, 2.0, np.float32), "b": np.full(1001, 2.0, np.float32)})
    exact = 2.0 * np.sqrt(store_mod.DIVERGENCE_SAMPLE * 3 + 1001)
    assert big.distance(sample) == pytest.approx(exact, rel=1e-3)


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


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_16_bit_wire_gradients_are_checked_like_float32_ones(wire):
    store = ParamStore("sgd", lr=0.1)
    store.init({"w": np.zeros((300, 400), np.float32), "h": np.zeros(3, np.float16)})
    for bad in (np.nan, np.inf, -np.inf):
        g = np.zeros((300, 400), np.float32)
        g[299, 399] = bad
        with pytest.raises(ValueError, match="non-finite"):
            store.check_gradient({"w": encode_wire(g, wire), "h": np.zeros(3, np.float16)})
    with pytest.raises(ValueError, match="wrong shape"):
        store.check_gradient({"w": encode_wire(np.zeros((400, 300), np.float32), wire), "h": np.zeros(3, np.float16)})
    with pytest.raises(ValueError, match="wrong dtype"):   # only float32 parameters travel as 16-bit values
        store.check_gradient({"w": np.zeros((300, 400), np.float32), "h": encode_wire(np.zeros(3, np.float32), wire)})
    assert not store.theta["w"].any()


def test_divergence_sample_covers_every_tensor_end_to_end_without_repeats():
    from paramserver import store as store_mod
    sizes = {"emb": 3_000_000, "a": 69_400, "b": 600, "tiny": 3}
    store = ParamStore("sgd", lr=1.0)
    store.init({n: np.zeros(k, np.float32) for n, k in sizes.items()})
    at = store._coordinates()
    total = 0
    for name, k in sizes.items():
        idx = at[name]
        idx = np.arange(k) if idx is None else idx
        assert len(np.unique(idx)) == len(idx) and idx.min() == 0 and idx.max() == k - 1   # distinct, both ends
        total += len(idx)
    assert store_mod.DIVERGENCE_SAMPLE / 2 <= total <= store_mod.DIVERGENCE_SAMPLE + len(sizes)
    # a change in one place only is seen (scaled up by total / sampled) when it falls in a sampled run
    _, sample = store.sample()
    g = {n: np.zeros(k, np.float32) for n, k in sizes.items()}
    g["emb"][-1] = -1.0                       # the very last value: always sampled
    store.apply(g)
    scale = np.sqrt(sum(sizes.values()) / total)
    assert store.distance(sample) == pytest.approx(scale, rel=1e-6)
