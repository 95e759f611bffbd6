"""paramserver/snapshots.py, through ParamStore.snapshot / track / apply: a snapshot never changes under its
send, buffers are recycled and capped, an update waits for a send but never for a stalled one, and 16-bit
wire copies are made once per version."""
from __future__ import annotations

import numpy as np
import pytest

from paramserver.store import ParamStore


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


def test_snapshot_is_stable_while_theta_changes():
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(2, np.float32)})
    version, snap = store.snapshot()
    store.apply({"w": np.ones(2, np.float32)})
    assert version == 0 and snap["w"].tolist() == [0.0, 0.0]
    assert store.snapshot()[1]["w"].tolist() == [-1.0, -1.0]


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
