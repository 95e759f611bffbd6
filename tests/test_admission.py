"""paramserver/admission.py: push admission (--max-pushes-in-flight): only admitted workers send, the rest wait
their turn; slots given back by dead workers and lapsed reservations; every gradient applied once under loss and
duplication. The unit tests need no socket."""
from __future__ import annotations

import functools
import threading
from collections import Counter

import numpy as np

from common.config import ServerConfig
from common.protocol import Message, MsgType, decode
from paramserver.admission import Admission
from tests.conftest import wait_for
from tests.test_server import _ask, _raw_socket
from worker.client import PSClient

_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


# -- the slots on their own, without a socket --------------------------------------------------------

def _ask_slot(worker: int) -> Message:
    return Message(MsgType.PUSH, worker=worker, seq=1, meta={"reserve": True})


def test_slots_are_granted_in_id_order_in_sync_on_the_newest_route():
    granted = []
    adm = Admission(ServerConfig(num_workers=3, mode="sync", max_pushes_in_flight=1), Counter(),
                    grant=lambda worker, identity, msg: granted.append((worker, identity)))
    assert adm.reserve(b"r0", _ask_slot(0)).meta["status"] == "reserved"
    assert adm.reserve(b"r2", _ask_slot(2)) is None and adm.reserve(b"r1", _ask_slot(1)) is None
    assert adm.reroute(b"r1-new", _ask_slot(1))                   # a resend while it waits
    adm.release(0)
    assert granted == [(1, b"r1-new")] and set(adm.slots) == {1} and list(adm.queue) == [2]
    adm.drop(1)                                                   # gone: its slot goes to the next
    assert granted[-1] == (2, b"r2") and not adm.queue
    assert adm.status() == {"in_use": 1, "waiting": 0, "limit": 1}


def test_a_slot_freed_while_a_message_is_handled_is_granted_after_it():
    granted = []
    adm = Admission(ServerConfig(num_workers=2, mode="async", max_pushes_in_flight=1), Counter(),
                    grant=lambda worker, identity, msg: granted.append(worker))
    adm.reserve(b"r0", _ask_slot(0))
    adm.reserve(b"r1", _ask_slot(1))
    adm.handling = True
    adm.release(0)
    assert granted == []                                          # not while the gradient's buffers are held
    adm.handling = False
    adm.admit_waiting()
    assert granted == [1]


# -- against a live server --------------------------------------------------------------------------

BIG = {"w": np.zeros(1 << 18, np.float32)}          # 1 MiB: big enough to ask before sending


def test_only_admitted_workers_send_gradients_and_the_rest_wait_their_turn(start_server):
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1)
    a = PSClient(srv.address, worker=0, server_timeout=30)
    b = PSClient(srv.address, worker=1, server_timeout=30)
    a.register(init=BIG)
    b.register()
    assert a.push_slots == b.push_slots == 1                    # the WELCOME says so
    pa, pb = a.pull(), b.pull()
    # worker 0 takes the only slot (as PSClient.push does before a big gradient) and holds it
    ack = a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version, meta={"reserve": True}))
    assert ack.meta["status"] == "reserved"
    done = threading.Event()
    threading.Thread(target=lambda: (b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock),
                                     done.set()), daemon=True).start()
    _wait_for(lambda: srv.server.admission.queue, what="worker 1 to ask")
    assert not done.wait(0.5) and srv.server.store.version == 0  # worker 1 waits: its gradient is not sent
    assert srv.server.status()["push_slots"] == {"in_use": 1, "waiting": 1, "limit": 1}
    a.push({"w": np.ones(1 << 18, np.float32)}, pa.version, pa.clock)   # worker 0's gradient frees the slot
    assert done.wait(30) and srv.server.store.version == 2
    assert np.allclose(srv.server.store.theta["w"], -0.1)     # both applied once (lr/N each, mean of 2)
    a.close(), b.close()


def test_a_waiting_worker_is_told_to_send_only_once_the_last_gradient_is_let_go(start_server):
    # with one slot, the next gradient must not start arriving while the last one's buffers are still held
    # (two gradients in memory): the grant goes out after the handled message's frames are dropped
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1)
    server = srv.server
    a = PSClient(srv.address, worker=0, server_timeout=30)
    b = PSClient(srv.address, worker=1, server_timeout=30)
    a.register(init=BIG)
    b.register()
    pa, pb = a.pull(), b.pull()
    assert a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version,
                              meta={"reserve": True})).meta["status"] == "reserved"
    held, frames_at_grant = {}, []
    handle, send = server._handle, server._send

    def spy_handle(frames):
        if len(frames) > 2:   # a message with tensors: worker 0's gradient
            held["frames"] = frames
        handle(frames)

    def spy_send(identity, msg, track=False):
        if isinstance(msg, list):
            m = decode(msg)
            if m.worker == 1 and m.meta.get("status") == "reserved":
                frames_at_grant.append(len(held.get("frames", ["not handled yet"])))
        return send(identity, msg, track)
    server._handle, server._send = spy_handle, spy_send
    done = threading.Event()
    threading.Thread(target=lambda: (b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock),
                                     done.set()), daemon=True).start()
    _wait_for(lambda: server.admission.queue, what="worker 1 to ask")
    a.push({"w": np.ones(1 << 18, np.float32)}, pa.version, pa.clock)
    assert done.wait(30) and server.store.version == 2
    assert frames_at_grant == [0]     # worker 0's frames were already let go of when worker 1 was admitted
    a.close(), b.close()


def test_a_dead_workers_slot_is_given_back(start_server):
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1,
                       worker_timeout=1.0)
    a = PSClient(srv.address, worker=0, server_timeout=30)
    b = PSClient(srv.address, worker=1, server_timeout=30, heartbeat=0.2)
    a.register(init=BIG)
    b.register()
    pa, pb = a.pull(), b.pull()
    a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version, meta={"reserve": True}))
    a.close()                                                  # dies holding the slot (no heartbeats)
    ack = b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock)
    assert ack.meta["status"] == "applied" and srv.server.counters["dead"] == 1
    b.close()


def test_admission_under_lost_and_duplicated_messages_applies_every_gradient_once(start_server):
    """Reservations are requests like any other: resent when lost, answered once, never a gradient twice."""
    srv = start_server(num_workers=3, mode="sync", optimizer="sgd", lr=0.5, aggregate="sum",
                       max_pushes_in_flight=1)
    steps, errors = 6, []

    def run(rank):
        try:
            with PSClient(srv.address, worker=rank, request_timeout=0.3, server_timeout=60, drop=0.15,
                          duplicate=0.15, fault_seed=rank + 7) as ps:
                ps.register(init=BIG if rank == 0 else None)
                for _ in range(steps):
                    p = ps.pull()
                    ps.push({"w": np.full(1 << 18, rank + 1, np.float32)}, p.version, p.clock)
                ps.leave()
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert srv.server.policy.step == steps
    assert np.all(srv.server.store.theta["w"] == -0.5 * (1 + 2 + 3) * steps)   # every gradient exactly once
    assert not srv.server.admission.slots and not srv.server.admission.queue


def test_a_worker_removed_while_waiting_for_a_slot_asks_again_and_pushes(start_server):
    """Its reservation was never answered: a resend must not get an older cached ACK (it used to, forever,
    and the worker hung), but be handled anew: unknown_worker, register again, ask again, push."""
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1,
                       worker_timeout=1.0)
    a = PSClient(srv.address, worker=0, server_timeout=60, heartbeat=0.2)
    b = PSClient(srv.address, worker=1, server_timeout=60, request_timeout=2.0)   # no heartbeats: it will die
    a.register(init=BIG)
    b.register()
    pa, pb = a.pull(), b.pull()
    b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock)          # an ACK is now cached for b
    pb = b.pull()
    a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version, meta={"reserve": True}))
    done = threading.Event()
    threading.Thread(target=lambda: (b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock),
                                     done.set()), daemon=True).start()
    _wait_for(lambda: srv.server.counters["dead"] == 1, what="worker 1 to be declared dead while queued")
    a.push({"w": np.ones(1 << 18, np.float32)}, pa.version, pa.clock)          # the slot is free again
    assert done.wait(40), "worker 1 never pushed"
    assert srv.server.store.version == 3 and b.stats["reregistrations"] >= 1
    a.close(), b.close()


def test_an_unused_slot_lapses_after_the_worker_timeout(start_server):
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1,
                       worker_timeout=1.5)
    a = PSClient(srv.address, worker=0, server_timeout=30, heartbeat=0.2)     # alive, but never sends
    b = PSClient(srv.address, worker=1, server_timeout=30, heartbeat=0.2)
    a.register(init=BIG)
    b.register()
    pa, pb = a.pull(), b.pull()
    a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version, meta={"reserve": True}))
    ack = b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock)    # waits for the lapse, not forever
    assert ack.meta["status"] == "applied" and srv.server.counters["dead"] == 0
    assert 0 not in srv.server.admission.slots
    a.close(), b.close()


def test_unadmitted_pushes_are_counted_and_a_leaving_workers_shm_segment_is_dropped(start_server):
    from worker.shmclient import ShmClient
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, max_pushes_in_flight=1)
    asking = PSClient(srv.address, worker=0, server_timeout=30)
    asking.register(init=BIG)
    p = asking.pull()
    asking.push({"w": np.ones(1 << 18, np.float32)}, p.version, p.clock)      # asks first: not counted
    raw = _raw_socket(srv.address)
    reply = _ask(raw, Message(MsgType.REGISTER, worker=1, seq=1))
    reply = _ask(raw, Message(MsgType.PUSH, worker=1, seq=2, clock=0, version=reply.version,
                              tensors={"w": np.ones(1 << 18, np.float32)}))  # a client of its own: not asking
    assert reply.meta["status"] == "applied"
    assert srv.server.counters["unadmitted_pushes"] == 1
    assert srv.server.transport.shm is not None or not __import__("common.shm").shm.available()
    if srv.server.transport.shm is not None:                                    # same-host shared memory available
        with ShmClient(srv.address, worker=2, server_timeout=30) as ps:
            ps.register()
            p = ps.pull()
            ps.push({"w": np.ones(1 << 18, np.float32)}, p.version, p.clock)
            assert ps.stats["shm_pushes"] == 1                               # through /dev/shm: nothing to admit
            assert len(srv.server.transport.shm.grads.segments) == 1
            ps.leave()
        assert srv.server.counters["unadmitted_pushes"] == 1
        assert not srv.server.transport.shm.grads.segments and len(srv.server.transport.shm.grads.pool) <= 1
    raw.close()
    asking.close()


def test_step_timeout_spares_a_worker_waiting_for_admission_not_one_holding_a_slot(start_server):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, max_pushes_in_flight=1,
                       worker_timeout=60, step_timeout=1.0)
    a = PSClient(srv.address, worker=0, server_timeout=30, heartbeat=0.1)   # takes the slot, then hangs
    b = PSClient(srv.address, worker=1, server_timeout=30, heartbeat=0.1)
    a.register(init=BIG)
    b.register()
    pa, pb = a.pull(), b.pull()
    a._request(Message(MsgType.PUSH, clock=pa.clock, version=pa.version, meta={"reserve": True}))
    # worker 1 waits for the slot longer than --step-timeout: it is not hung, worker 0 (holding it) is
    ack = b.push({"w": np.ones(1 << 18, np.float32)}, pb.version, pb.clock)
    assert ack.meta["status"] == "applied" and srv.server.policy.step == 1
    assert srv.server.counters["step_timeouts"] == 1
    status = srv.server.status()["workers"]
    assert status["0"]["state"] == "dead" and status["1"]["state"] == "live"
    a.close(), b.close()
