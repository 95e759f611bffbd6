"""paramserver/sessions.py: who may act as a worker (identity binding, --auth keys, the --max-workers cap and
automatic ids), exactly once across eviction and re-registration (sequence dedup, cached replies), and liveness
(--step-timeout). The unit tests need no socket; the others run against a live server."""
from __future__ import annotations

import functools
import os
import time
import types
from collections import Counter

import numpy as np
import pytest

from common.config import ServerConfig
from common.protocol import Message, MsgType, decode
from paramserver.sessions import MAX_SEQ_JUMP, Peer, RequestError, Sessions
from tests.conftest import wait_for
from tests.test_server import GRAD, THETA, _ask, _raw_socket
from worker.client import PSClient, ServerError

_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


# -- the record on its own, without a socket -------------------------------------------------------

def test_a_resent_push_is_answered_from_the_record_and_an_older_one_is_not():
    sessions = Sessions(ServerConfig(num_workers=2), Counter())
    peer = Peer(b"session-a")
    worker = sessions.worker_id_for(Message(MsgType.REGISTER, seq=1), peer, awaiting=set())
    assert worker == 0 and sessions.bind(worker, b"route-1", peer, seq=1) is None
    push = Message(MsgType.PUSH, worker=0, seq=2)
    assert sessions.gate(b"route-1", push, peer) is None and sessions.seen_before(push) is None   # new
    ack = sessions.record(push, peer, Message(MsgType.ACK, worker=0, seq=2, meta={"status": "applied"}))
    assert isinstance(ack, list) and decode(ack).meta["status"] == "applied"      # cached encoded
    state = sessions.seen_before(push)                                            # its resend
    assert state is not None and sessions.cached_reply(push, state) == ack
    older = Message(MsgType.PULL, worker=0, seq=1)
    assert sessions.cached_reply(older, sessions.seen_before(older)) is None
    assert sessions.gate(b"route-2", Message(MsgType.PULL, worker=0, seq=3), peer) is None
    assert sessions.workers[0].identity == b"route-2"                             # replies take the newest route


def test_another_session_and_a_far_sequence_jump_are_refused():
    sessions = Sessions(ServerConfig(num_workers=1), Counter())
    sessions.bind(0, b"route", Peer(b"mine"), seq=1)
    assert sessions.gate(b"x", Message(MsgType.HEARTBEAT, worker=0), Peer(b"other"))[0] == "identity"
    far = Message(MsgType.PULL, worker=0, seq=2 + MAX_SEQ_JUMP)
    assert sessions.gate(b"route", far, Peer(b"mine"))[0] == "bad_seq"
    with pytest.raises(RequestError, match="live on another connection"):
        sessions.worker_id_for(Message(MsgType.REGISTER, worker=0), Peer(b"other"), awaiting=set())
    sessions.workers[0].alive = False                                             # dead: taken over by another
    assert sessions.worker_id_for(Message(MsgType.REGISTER, worker=0), Peer(b"other"), awaiting=set()) == 0
    replaced = sessions.bind(0, b"new", Peer(b"other"), seq=1)
    assert replaced is not None and replaced.session == b"mine" and sessions.workers[0].session == b"other"


def test_a_silent_worker_is_declared_dead_on_the_servers_own_counter():
    events = Counter()
    sessions = Sessions(ServerConfig(num_workers=1, worker_timeout=1.0), events)
    sessions.bind(0, b"route", Peer(b"s"), seq=1)
    policy = types.SimpleNamespace(clocks={0: 0}, awaiting=set())
    removed = []
    sessions.sweep_silent(time.monotonic() + 0.5, policy, removed.append)
    assert removed == [] and events["dead"] == 0
    sessions.sweep_silent(time.monotonic() + 2.0, policy, removed.append)
    assert removed == [0] and events["dead"] == 1


# -- against a live server --------------------------------------------------------------------------

class LosesFirstPushAck(PSClient):
    """A client whose network loses the reply to its first PUSH (the request itself arrives)."""

    lost = False

    def _request(self, msg, reregister=True, **kw):
        if msg.type == MsgType.PUSH and not self.lost:
            self.lost = True
            self._drop_next_reply = True
        return super()._request(msg, reregister, **kw)

    def _send(self, frames):
        super()._send(frames)
        if getattr(self, "_drop_next_reply", False):
            # the server applies the push and answers; the answer is lost before we read it
            assert self.sock.poll(5000)
            self.sock.recv_multipart()
            self._drop_next_reply = False


def test_lost_ack_and_eviction_before_the_resend_apply_the_push_once(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, aggregate="sum", worker_timeout=0.4)
    # request_timeout > worker_timeout and no heartbeats: the server declares the worker dead before the resend
    with LosesFirstPushAck(srv.address, worker=0, request_timeout=1.5, server_timeout=20) as ps:
        ps.register(init=THETA)
        ack = ps.push(GRAD, version=0, clock=0)
        assert ack.meta["status"] == "applied"
        assert srv.server.counters["dead"] == 1          # it really was evicted before the resend
        assert srv.server.store.version == 1                   # one logical push, one update
        for name in THETA:
            np.testing.assert_array_equal(srv.server.store.theta[name], THETA[name] - np.float32(0.1) * GRAD[name])
        # the worker goes on: its next request finds it unknown, it registers again and is served
        assert ps.pull().version == 1
        assert ps.stats["reregistrations"] == 1
    assert srv.server.counters["duplicates"] == 1


def test_a_retry_after_reregistration_keeps_its_sequence_number(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, worker_timeout=0.3)
    seen = []
    handler = srv.server.handlers[MsgType.PUSH]
    srv.server.handlers[MsgType.PUSH] = lambda identity, msg, peer: (seen.append(msg.seq),
                                                                     handler(identity, msg, peer))[1]
    with PSClient(srv.address, worker=0, request_timeout=0.5, server_timeout=20) as ps:
        ps.register(init=THETA)
        _wait_for(lambda: not srv.server.workers[0].alive, what="the worker to be declared dead")
        ps.push(GRAD, version=0, clock=0)          # refused (unknown worker), registered again, retried
    assert len(seen) == 2 and seen[0] == seen[1]    # the retry is the same request, not a new one
    assert srv.server.store.version == 1


def _train(address: str, rank: int, n: int, steps: int, results: dict):
    from common.config import WorkerConfig
    from tests.conftest import run_worker_thread
    cfg = WorkerConfig(server=address, rank=rank, num_workers=n, job="linear", batch_size=8, steps=steps,
                       eval_every=0, log_every=0, threads=1, heartbeat=0.2, request_timeout=0.3, log_level="error")
    return run_worker_thread(cfg, results)


def test_another_connection_cannot_act_as_a_live_worker(start_server):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05, worker_timeout=30)
    results = {}
    threads = [_train(srv.address, r, 2, 150, results) for r in range(2)]
    _wait_for(lambda: srv.server.store.version >= 5, what="training to start")
    intruder = _raw_socket(srv.address)
    # a PULL as worker 0 with a huge seq used to poison worker 0's dedup record (it then died: stale_request)
    reply = _ask(intruder, Message(MsgType.PULL, worker=0, seq=2**62))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "identity"
    # a fake REGISTER for live worker 1 used to reset it and stall the sync job for --worker-timeout
    reply = _ask(intruder, Message(MsgType.REGISTER, worker=1, seq=1))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "worker_live"
    # nor a push, a heartbeat or a goodbye in its name
    for mtype in (MsgType.PUSH, MsgType.HEARTBEAT, MsgType.LEAVE):
        reply = _ask(intruder, Message(mtype, worker=0, seq=10**6, tensors=GRAD if mtype == MsgType.PUSH else {}))
        assert reply.meta["code"] == "identity", mtype
    intruder.close()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, dict) and len(r["steps"]) == 150 for r in results.values()), results
    assert srv.server.policy.step == 150                   # every step had both real workers
    assert srv.server.counters["refused:identity"] == 4
    assert srv.server.counters["refused:worker_live"] == 1


def test_a_far_sequence_jump_is_refused_not_adopted(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        ps.pull()
        ps.seq += 2**40
        with pytest.raises(ServerError) as info:
            ps.pull()
        assert info.value.code == "bad_seq"
        ps.seq -= 2**40                                   # the worker's own numbering still works
        assert ps.pull().version == 0
    assert srv.server.workers[0].last_seq < 100


def test_registrations_are_capped_and_auto_ids_reuse_free_ranks(start_server):
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.1, max_workers=4)
    socks, ids = [], []
    for i in range(6):
        s = _raw_socket(srv.address)
        socks.append(s)
        reply = _ask(s, Message(MsgType.REGISTER, worker=-1, seq=1, tensors=THETA if i == 0 else {}))
        ids.append(reply.worker if reply.type == MsgType.WELCOME else reply.meta["code"])
    assert ids == [0, 1, 2, 3, "too_many_workers", "too_many_workers"]
    assert len(srv.server.workers) == 4
    # a worker that leaves frees its rank for the next automatic registration
    assert _ask(socks[1], Message(MsgType.LEAVE, worker=1, seq=2)).type == MsgType.ACK
    assert _ask(socks[4], Message(MsgType.REGISTER, worker=-1, seq=1)).worker == 1
    for s in socks:
        s.close()


def test_auth_binds_workers_to_keys_and_shutdown_to_admin_keys(start_server, tmp_path):
    from common.security import make_keys
    keys = make_keys(str(tmp_path / "keys"), ("server", "alice", "bob", "ops"))
    os.makedirs(tmp_path / "keys" / "admins")
    import shutil
    shutil.copy(keys["ops"][0], tmp_path / "keys" / "admins")
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, curve_secret=keys["server"][1],
                       auth=str(tmp_path / "keys" / "clients"))

    def client(name, worker=-1):
        return PSClient(srv.address, worker=worker, request_timeout=0.3, server_timeout=10,
                        curve_server=keys["server"][0], curve_secret=keys[name][1])

    with client("alice", 0) as alice, client("bob", 0) as bob, client("ops") as ops:
        alice.register(init=THETA)
        with pytest.raises(ServerError) as info:       # bob holds an admitted key, but not alice's
            bob.register()
        assert info.value.code == "identity"
        alice.push(GRAD, version=0, clock=0)
        with pytest.raises(ServerError) as info:
            bob.shutdown()
        assert info.value.code == "not_admin"
        assert srv.thread.is_alive()
        alice.leave()
        with pytest.raises(ServerError):                # a left worker is taken over only with its own key
            bob.register()
        ops.shutdown()
    _wait_for(lambda: not srv.thread.is_alive(), what="the admin's shutdown")


def test_a_hung_worker_with_live_heartbeats_is_dropped_by_step_timeout(start_server):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, worker_timeout=60, step_timeout=1.0)
    results = {}
    t = _train(srv.address, 0, 2, 20, results)
    _wait_for(lambda: srv.server.store.initialized, what="worker 0 to register")
    with PSClient(srv.address, worker=1, heartbeat=0.1, server_timeout=30) as hung:
        hung.register()
        hung.pull()                                    # it gets theta, then hangs: heartbeats only
        t.join(timeout=60)
        assert isinstance(results[0], dict) and len(results[0]["steps"]) == 20, results
        assert srv.server.counters["step_timeouts"] == 1
        assert srv.server.status()["workers"]["1"]["state"] == "dead"


def test_auto_ids_reuse_dead_ids_beyond_the_job_and_never_an_awaited_one(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, max_workers=3, worker_timeout=30)
    socks = [_raw_socket(srv.address) for _ in range(4)]
    ids = [_ask(s, Message(MsgType.REGISTER, worker=-1, seq=1, tensors=THETA if i == 0 else {})).worker
           for i, s in enumerate(socks[:3])]
    assert ids == [0, 1, 2]
    assert _ask(socks[2], Message(MsgType.LEAVE, worker=2, seq=2)).type == MsgType.ACK
    assert _ask(socks[3], Message(MsgType.REGISTER, worker=-1, seq=1)).worker == 2    # id 2 reused
    for s in socks:
        s.close()


def test_under_auth_the_same_key_does_not_take_over_a_live_worker(start_server, tmp_path):
    from common.security import make_keys
    keys = make_keys(str(tmp_path / "keys"), ("server", "alice"))
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, curve_secret=keys["server"][1],
                       auth=str(tmp_path / "keys" / "clients"), worker_timeout=30)
    kw = dict(request_timeout=0.3, curve_server=keys["server"][0], curve_secret=keys["alice"][1])
    with PSClient(srv.address, worker=0, server_timeout=10, **kw) as first, \
            PSClient(srv.address, worker=0, server_timeout=1, **kw) as second:
        first.register(init=THETA)
        with pytest.raises(ServerError) as info:     # waits for the id to be freed, then gives up
            second.register()
        assert info.value.code == "worker_live"
        first.push(GRAD, version=0, clock=0)         # the first one trains on
    assert srv.server.store.version == 1
