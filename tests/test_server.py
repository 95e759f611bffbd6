"""paramserver/server.py: the receive loop and its handlers: 16-bit pushes, odd peers, errors between messages and
in a handler, a refused REGISTER and the shard plan, divergence, snapshots recycled through real sends. Each test
runs against a live server. Sessions, admission, checkpoints and the transport have test files of their own."""
from __future__ import annotations

import functools
import socket
import threading

import numpy as np
import pytest
import zmq

from common.protocol import Message, MsgType, decode, encode
from tests.conftest import wait_for
from worker.client import PSClient

THETA = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
GRAD = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(2, 0.25, np.float32)}


_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


# helpers, also of tests/test_sessions.py, test_admission.py, test_checkpointer.py and test_transport.py

def _raw_socket(address: str, routing_id: bytes = b"") -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(address)
    return s


def _ask(sock: zmq.Socket, msg: Message) -> Message:
    sock.send_multipart(encode(msg))
    assert sock.poll(5000), "no answer"
    return decode(sock.recv_multipart())


def _theta(srv) -> dict:
    return {n: t.copy() for n, t in srv.server.store.theta.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pull_push_at_once(clients: list, grad: dict, steps: int, raw: bool = False, timeout: float = 60) -> None:
    """Each client pulls and pushes `grad` `steps` times, all in threads at once; raises the first error."""
    errors = []

    def work(ps):
        try:
            for _ in range(steps):
                p = ps.pull(raw=raw)
                ps.push(grad, p.version, p.clock)
        except BaseException as exc:   # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(ps,)) for ps in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads) and not errors, errors


@pytest.mark.parametrize("mode,optimizer", [("async", "sgd"), ("async", "adam"), ("sync", "sgd")])
def test_bf16_pushes_move_theta_exactly_as_their_widened_values(start_server, mode, optimizer):
    # async plain SGD adds the 16-bit values as they came (no float32 copy); the other cases widen them first
    from common.protocol import decode_wire, encode_wire
    from paramserver.store import ParamStore
    srv = start_server(num_workers=1, mode=mode, optimizer=optimizer, lr=0.05)
    rng = np.random.default_rng(3)
    init = {"w": rng.standard_normal((256, 300)).astype(np.float32), "b": np.zeros(7, np.float32)}
    ref = ParamStore(optimizer, lr=0.05)
    ref.init(init)
    with PSClient(srv.address, worker=0, server_timeout=30, wire_dtype="bf16") as ps:
        ps.register(init=init)
        for _ in range(3):
            p = ps.pull()
            g = {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in init.items()}
            assert ps.push(g, p.version, p.clock).meta["status"] == "applied"
            ref.apply({n: decode_wire(encode_wire(t, "bf16")) for n, t in g.items()})
    for n in init:
        np.testing.assert_array_equal(srv.server.store.theta[n], ref.theta[n])
    # async Adam widened a slice at a time into the store's one buffer (here, the whole 77K values fit in it);
    # async SGD never made a float32 copy
    widened = srv.server.store._widen_buf
    assert (widened is not None) == ((mode, optimizer) == ("async", "adam"))


# -- odd peers and failing disks (found by a review of this module) --------------------------------

def test_a_held_shared_memory_pull_asking_for_bf16_is_answered_over_the_socket(start_server):
    """A pull that asks for shared memory and a 16-bit wire, held at the barrier and answered by the sweep
    (outside any message's handling), used to raise in the sweep and end the server."""
    from common import shm
    if not shm.available():
        pytest.skip("no writable /dev/shm")
    from common.protocol import ROLE_HEARTBEAT, ROLE_REQUESTS, new_session, routing_id
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, worker_timeout=2.0)
    session = new_session()
    odd, beat = _raw_socket(srv.address, routing_id(session, ROLE_REQUESTS)), \
        _raw_socket(srv.address, routing_id(session, ROLE_HEARTBEAT))
    gone = PSClient(srv.address, worker=0, server_timeout=10, heartbeat=0.2)
    gone.register(init=THETA)
    _ask(odd, Message(MsgType.REGISTER, worker=1, seq=1, meta={"shm_offer": True}))
    beat.send_multipart(encode(Message(MsgType.HEARTBEAT, worker=1)))
    p0, p1 = gone.pull(), _ask(odd, Message(MsgType.PULL, worker=1, seq=2, meta={"shm": True}))
    _ask(odd, Message(MsgType.PUSH, worker=1, seq=3, clock=p1.clock, version=p1.version, tensors=GRAD))
    odd.send_multipart(encode(Message(MsgType.PULL, worker=1, seq=4, meta={"shm": True, "wire": "bf16"})))
    _wait_for(lambda: 1 in srv.server.pending)                          # held at the barrier for worker 0
    assert srv.server.policy.step == 0
    gone.close()       # worker 0 goes silent: the sweep declares it dead and completes the step without it
    for _ in range(300):   # worker 1 keeps beating meanwhile
        beat.send_multipart(encode(Message(MsgType.HEARTBEAT, worker=1)))
        if odd.poll(100):
            break
    else:
        raise AssertionError("the held pull was never answered")
    reply = decode(odd.recv_multipart(), raw=True)
    assert reply.type == MsgType.PARAMS and reply.version == 1 and "shm" not in reply.meta
    assert {t.wire for t in reply.tensors.values()} == {"bf16"}          # over the socket, in bf16
    assert srv.thread.is_alive() and srv.server.counters["internal_errors"] == 0
    assert srv.server.counters["dead"] == 1
    odd.close()
    beat.close()


def test_an_error_between_messages_is_counted_and_the_server_keeps_serving(start_server, monkeypatch):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, worker_timeout=60)
    calls = []

    def broken(now):
        calls.append(now)
        raise RuntimeError("a bug in the sweep")
    monkeypatch.setattr(srv.server, "_sweep_dead", broken)
    _wait_for(lambda: len(calls) >= 2)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        p = ps.pull()
        assert ps.push(GRAD, p.version, p.clock).meta["status"] == "applied"
    assert srv.thread.is_alive() and srv.server.counters["internal_errors"] >= 2


def test_a_refused_register_does_not_fix_the_shard_plan(start_server):
    from common.shards import ShardPlan
    from worker.sharded import ShardedClient
    shards = [start_server(num_workers=2, mode="sync", shard_index=i, num_shards=2) for i in range(2)]
    plan = ShardPlan.from_tensors(THETA, 2)
    wrong = _raw_socket(shards[0].address)
    reply = _ask(wrong, Message(MsgType.REGISTER, worker=0, seq=1, tensors=plan.split(THETA)[0],
                                meta={"job": {"num_workers": 3}, "shard": {**plan.identity(0), "layout": plan.layout}}))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "job_mismatch"
    assert shards[0].server.shard["plan"] == ""                  # not adopted by a refused REGISTER
    with ShardedClient([s.address for s in shards], worker=1, server_timeout=10) as ps:
        ps.register(init=THETA, job={"num_workers": 2})          # the job's first real worker is not refused
    assert shards[0].server.shard["plan"] == plan.hash
    wrong.close()


def test_a_bug_in_a_handler_is_an_internal_error_and_the_server_keeps_serving(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    handler = srv.server.handlers[MsgType.STATUS]

    def broken(identity, msg, peer):
        raise RuntimeError("a bug of ours")
    srv.server.handlers[MsgType.STATUS] = broken
    raw = _raw_socket(srv.address)
    reply = _ask(raw, Message(MsgType.STATUS, seq=1))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "internal"
    assert "RuntimeError: a bug of ours" in reply.meta["error"]
    assert srv.server.counters["internal_errors"] == 1
    srv.server.handlers[MsgType.STATUS] = handler
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        p = ps.pull()
        assert ps.push(GRAD, p.version, p.clock).meta["status"] == "applied"
        assert ps.status()["version"] == 1
    raw.close()


def test_no_track_divergence_records_none_and_keeps_no_samples(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, track_divergence=False)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        for _ in range(3):
            p = ps.pull()
            ps.push(GRAD, p.version, p.clock)
    assert [u[5] for u in srv.server.record.updates] == [None] * 3 and srv.server.divergence.held == {}


def test_sync_divergence_is_zero_and_takes_no_sample(start_server):
    # in sync theta cannot change between a worker's pull and its applied push: 0, with no sample kept
    srv = start_server(num_workers=1, mode="sync", optimizer="sgd", lr=0.1)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        for _ in range(3):
            p = ps.pull()
            ps.push(GRAD, p.version, p.clock)
    assert [u[5] for u in srv.server.record.updates] == [0.0] * 3 and srv.server.divergence.held == {}


@pytest.mark.parametrize("every", [1, 3])
def test_divergence_every_k_samples_every_kth_pull_of_each_worker(start_server, every):
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, divergence_every=every)
    a, b = (PSClient(srv.address, worker=w, server_timeout=10) for w in (0, 1))
    a.register(init=THETA)
    b.register()
    for _ in range(6):   # each of a's pushes is one version stale: b pushed between a's pull and its push
        p = a.pull()
        q = b.pull()
        b.push(GRAD, q.version, q.clock)
        a.push(GRAD, p.version, p.clock)
    measured = [u[5] is not None for u in srv.server.record.updates if u[2] == 0]
    assert measured == [(i + 1) % every == 0 for i in range(6)]
    assert all(u[5] > 0 for u in srv.server.record.updates if u[2] == 0 and u[5] is not None)
    a.close()
    b.close()


def test_an_unsampled_fresh_push_has_no_divergence_not_zero(start_server):
    # in async a push whose pull took no sample gets None even when theta has not changed since: a 0.0 there
    # would make the measured pushes lean towards fresh ones
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, divergence_every=2)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        for _ in range(4):
            p = ps.pull()
            ps.push(GRAD, p.version, p.clock)
    assert [u[5] for u in srv.server.record.updates] == [None, 0.0, None, 0.0]


def test_auto_divergence_samples_while_it_costs_under_5_percent_of_the_apply(start_server):
    from paramserver import divergence as server_mod
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    server = srv.server
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        p = ps.pull()
        ps.push(GRAD, p.version, p.clock)
        assert server.divergence.held.get(0)                        # nothing spent yet: the first pull samples
        server.divergence.held.clear()
        server.phases.seconds["divergence"] = 1.0                   # over budget: 1 s against (far) under 20 s
        assert server.policy.apply_s < 1.0 / server_mod.DIVERGENCE_BUDGET
        p = ps.pull()
        ps.push(GRAD, p.version, p.clock)
        assert not server.divergence.held.get(0)
        server.policy.apply_s = 2.0 / server_mod.DIVERGENCE_BUDGET  # back within it
        p = ps.pull()
        assert server.divergence.held.get(0)


def test_a_resent_pull_does_not_evict_the_sample_a_prefetched_push_needs(start_server):
    """With async prefetch a push is computed on the pull before the last; a resend of the last pull (its
    reply lost) adds one more sample: the push's base must still be there for its divergence."""
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, divergence_every=1)
    raw = _raw_socket(srv.address)
    other = PSClient(srv.address, worker=1, server_timeout=10)
    _ask(raw, Message(MsgType.REGISTER, worker=0, seq=1, tensors=THETA))
    other.register()

    def bump():
        q = other.pull()
        other.push(GRAD, q.version, q.clock)
    first = _ask(raw, Message(MsgType.PULL, worker=0, seq=2))           # the theta the push is computed on
    bump()
    prefetch = Message(MsgType.PULL, worker=0, seq=3)
    assert _ask(raw, prefetch).version == first.version + 1
    bump()
    assert _ask(raw, prefetch).version == first.version + 2            # the resend, answered at the newest theta
    ack = _ask(raw, Message(MsgType.PUSH, worker=0, seq=4, clock=first.clock, version=first.version, tensors=GRAD))
    assert ack.meta["status"] == "applied"
    mine = [u for u in srv.server.record.updates if u[2] == 0]
    assert mine[-1][3] == 2 and mine[-1][5] is not None and mine[-1][5] > 0   # stale by 2, divergence measured
    other.close()
    raw.close()


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_snapshots_are_recycled_through_real_zeromq_sends(start_server, optimizer, wire):
    """Over tcp, with theta sent zero-copy and two workers pulling and pushing at once for 40 versions, the
    server's theta-sized snapshot buffers come from its pool: allocations stay within --snapshot-buffers (and,
    for a 16-bit wire, the 16-bit copies within the kept free ones plus those in flight), not one per version."""
    from paramserver import store as store_mod
    big = {"w": np.zeros((500, 400), np.float32), "b": np.zeros(100_000, np.float32)}   # frames sent zero-copy
    grad = {n: np.full(t.shape, 1e-3, np.float32) for n, t in big.items()}
    # (--snapshot-wait 5: on a loaded machine a send may take over the default 0.5 s and count as a stalled reader)
    srv = start_server(num_workers=2, mode="async", optimizer=optimizer, lr=0.1, snapshot_buffers=2, snapshot_wait=5.0)
    clients = [PSClient(srv.address, worker=rank, server_timeout=20, wire_dtype=wire) for rank in (0, 1)]
    clients[0].register(init=big)
    clients[1].register()
    try:
        _pull_push_at_once(clients, grad, 20, raw=True, timeout=120)
    finally:
        for ps in clients:
            ps.close()
    st = srv.server.status()
    assert st["version"] == 40
    snaps = st["snapshots"]
    bound = 2 if wire == "fp32" else 2 + store_mod.POOL_KEEP + 2   # (16-bit: kept free + the live one + 1 per worker)
    assert snaps["allocated"] <= bound, snaps
    assert snaps["over_cap"] == 0, snaps


