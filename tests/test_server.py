"""paramserver/server.py: who may act as a worker, exactly-once across eviction and restarts, the
resume barrier, --step-timeout, and bounded memory. Each test runs against a live server."""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import zmq

from common.checkpoint import load_checkpoint
from common.config import ConfigError, ServerConfig
from common.protocol import Message, MsgType, decode, encode
from paramserver.server import Server
from tests.conftest import ROOT, RunningServer, wait_for
from worker.client import PSClient, ServerError

THETA = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
GRAD = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(2, 0.25, np.float32)}


_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


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


# -- exactly once, also across eviction and re-registration --------------------------------------

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
    srv.server.handlers[MsgType.PUSH] = lambda identity, msg, peer: (seen.append(msg.seq), handler(identity, msg, peer))[1]
    with PSClient(srv.address, worker=0, request_timeout=0.5, server_timeout=20) as ps:
        ps.register(init=THETA)
        _wait_for(lambda: not srv.server.workers[0].alive, what="the worker to be declared dead")
        ps.push(GRAD, version=0, clock=0)          # refused (unknown worker), registered again, retried
    assert len(seen) == 2 and seen[0] == seen[1]    # the retry is the same request, not a new one
    assert srv.server.store.version == 1


def test_dedup_record_survives_a_server_restart(tmp_path):
    """A push applied and checkpointed whose ACK was lost is answered from the record after a resume."""
    ckpt = str(tmp_path / "ckpt.pt")
    first = RunningServer(num_workers=1, mode="async", optimizer="sgd", lr=0.1, checkpoint=ckpt)
    sock = _raw_socket(first.address, b"s" * 15 + b"R")
    assert _ask(sock, Message(MsgType.REGISTER, worker=0, seq=1, tensors=THETA)).type == MsgType.WELCOME
    push = Message(MsgType.PUSH, worker=0, seq=2, tensors=GRAD)
    assert _ask(sock, push).meta["status"] == "applied"        # pretend this ACK was lost
    first.stop()                                               # writes the checkpoint
    sock.close()
    assert load_checkpoint(ckpt)["workers"]["0"]["last_seq"] == 2
    second = RunningServer(num_workers=1, mode="async", optimizer="sgd", lr=0.1, resume=ckpt, worker_timeout=5)
    try:
        sock = _raw_socket(second.address, b"s" * 15 + b"R")
        reply = _ask(sock, push)                               # the resend, same session, same seq
        assert reply.type == MsgType.ACK and reply.meta["status"] == "applied"
        assert second.server.store.version == 1                # not applied a second time
        sock.close()
    finally:
        second.stop()


# -- resume keeps the barrier ---------------------------------------------------------------------

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pull_in_thread(ps: PSClient) -> tuple[threading.Thread, dict]:
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("reply", ps.pull()), daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("second_returns", [True, False])
def test_resume_holds_pulls_until_the_checkpoints_workers_are_back(tmp_path, second_returns):
    ckpt = str(tmp_path / "ckpt.pt")
    cfg = dict(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, aggregate="sum")
    first = RunningServer(checkpoint=ckpt, **cfg)
    clients = [PSClient(first.address, worker=r, server_timeout=20) for r in range(2)]
    for ps in clients:
        ps.register(init=THETA)
    for _ in range(2):                                   # two full steps with both workers
        for ps in clients:
            p = ps.pull()
        for ps in clients:
            ps.push(GRAD, version=p.version, clock=p.clock)
    first.server.write_checkpoint()                      # the periodic checkpoint, then the server is killed
    first.server.cfg.checkpoint = ""
    first.stop()
    for ps in clients:
        ps.close()
    assert load_checkpoint(ckpt)["step"] == 2

    second = RunningServer(resume=ckpt, worker_timeout=1.5 if not second_returns else 20, **cfg)
    try:
        back = PSClient(second.address, worker=0, request_timeout=0.3, server_timeout=20, heartbeat=0.2)
        back.register(init=THETA)
        t, out = _pull_in_thread(back)
        _wait_for(lambda: 0 in second.server.pending, what="the pull to reach the server")
        assert "reply" not in out and second.server.store.version == 2      # held: worker 1 is awaited
        assert second.server.status()["workers"]["1"]["state"] == "awaited"
        if second_returns:
            other = PSClient(second.address, worker=1, request_timeout=0.3, server_timeout=20, heartbeat=0.2)
            other.register(init=THETA)
            t.join(timeout=10)
            p1 = other.pull()
            p0 = out["reply"]
            assert p0.clock == p1.clock == 2
            back.push(GRAD, version=p0.version, clock=p0.clock)
            assert second.server.store.version == 2      # one gradient is not a step: the barrier holds
            other.push(GRAD, version=p1.version, clock=p1.clock)
            assert second.server.store.version == 3
            other.close()
        else:
            t.join(timeout=15)                           # the silent worker is given up after --worker-timeout
            assert out["reply"].clock == 2
            back.push(GRAD, version=out["reply"].version, clock=2)
            assert second.server.store.version == 3
        back.close()
    finally:
        second.stop()


def test_resume_with_other_flags_is_refused_unless_overridden(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2, mode="sync", lr=0.01, checkpoint=ckpt))
    srv.store.init(THETA)
    srv.write_checkpoint()
    with pytest.raises(ConfigError) as info:
        Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=3, mode="async", lr=0.01, resume=ckpt))
    assert "--mode sync (now async)" in str(info.value) and "--num-workers 2 (now 3)" in str(info.value)
    assert "--resume-override" in str(info.value)
    resumed = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=3, mode="async", lr=0.01, resume=ckpt,
                                  resume_override=True))
    assert resumed.store.initialized


def test_resume_with_a_changed_flag_fails_with_one_line_from_the_cli(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=1, lr=0.01, checkpoint=ckpt))
    srv.store.init(THETA)
    srv.write_checkpoint()
    r = subprocess.run([sys.executable, "-m", "paramserver", "server", "--resume", ckpt, "--lr", "0.02",
                        "--bind", "tcp://127.0.0.1:*"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "--lr 0.01 (now 0.02)" in r.stderr and "Traceback" not in r.stderr


# -- one connection, one worker -------------------------------------------------------------------

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


# -- --step-timeout ---------------------------------------------------------------------------------

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


# -- memory stays bounded ---------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_pins_a_bounded_amount_of_server_memory(tmp_path):
    """60 pulls of an 8 MiB theta that changes between pulls, never read: the server used to queue one
    snapshot per pull (480 MB); a send high-water mark alone would still queue 8 (64 MB). Now at most one
    PARAMS per worker is in ZeroMQ's queue and the next pull waits for it. Bound: 40 MB."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "paramserver", "server", "--bind", address, "--num-workers",
                               "1", "--mode", "async", "--optimizer", "sgd", "--no-track-divergence",
                               "--log-level", "warning"], env=dict(os.environ, PYTHONPATH=ROOT),
                              stderr=open(tmp_path / "server.log", "w"))
    size = 2**21                                                      # 8 MiB of float32
    theta = {"w": np.zeros(size, np.float32), "b": np.zeros(4, np.float32)}   # a small last frame too
    try:
        with PSClient(address, worker=0, server_timeout=30) as writer:
            writer.register(init=theta)
            reader = zmq.Context.instance().socket(zmq.DEALER)
            reader.setsockopt(zmq.LINGER, 0)
            reader.setsockopt(zmq.RCVHWM, 1)
            reader.setsockopt(zmq.RCVBUF, 4096)
            reader.connect(address)
            assert _ask(reader, Message(MsgType.REGISTER, worker=1, seq=1)).type == MsgType.WELCOME
            base = _rss_mb(server.pid)
            grad = {"w": np.full(size, 1e-3, np.float32), "b": np.ones(4, np.float32)}
            for i in range(60):
                reader.send_multipart(encode(Message(MsgType.PULL, worker=1, seq=2 + i)))
                writer.push(grad, version=i, clock=i)        # theta changes: every pull would be a new snapshot
            writer.pull()
            grown = _rss_mb(server.pid) - base
            status = writer.status()
            reader.close()
        print(f"\nserver RSS grew {grown:.1f} MB over 60 unread pulls of an 8 MiB theta")
        assert status["waiting_pulls"] == 1                 # the unread client's next pull waits for its first
        assert grown < 40, grown
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_resume_from_an_old_checkpoint_does_not_refuse_a_worker_whose_seq_moved_on(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    first = RunningServer(num_workers=1, mode="async", optimizer="sgd", lr=0.1, checkpoint=ckpt)
    ps = PSClient(first.address, worker=0, server_timeout=20, request_timeout=0.3)
    ps.register(init=THETA)
    ps.pull()
    first.server.write_checkpoint()               # the last periodic checkpoint...
    first.server.cfg.checkpoint = ""
    first.stop()
    ps.seq += 50_000                              # the worker made many requests between that checkpoint and the crash
    ps.close()
    second = RunningServer(num_workers=1, mode="async", optimizer="sgd", lr=0.1, resume=ckpt)
    try:
        again = PSClient(second.address, worker=0, server_timeout=20, request_timeout=0.3)
        again.session, again.seq = ps.session, ps.seq             # the same client, reconnected
        again.sock.close()
        again.sock = again._connect(b"R")
        again._register_args = (THETA, None)
        assert again.pull().version == 0          # unknown_worker -> registers again -> served, not bad_seq
        assert again.stats["reregistrations"] == 1
        again.close()
    finally:
        second.stop()


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


def test_the_automatic_frame_limit_is_the_protocols_largest_frame(start_server):
    """Before theta is known the limit is one 24 MiB chunk plus the header: a 26 MiB frame is refused
    by ZeroMQ; a 40 MiB tensor sent by `encode` (in chunks) is accepted."""
    from common.protocol import CHUNK_BYTES
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    with _raw_socket(srv.address) as s:
        frames = encode(Message(MsgType.STATUS, seq=1))
        s.send_multipart(frames + [b"\0" * (CHUNK_BYTES + 2 * 2**20)])   # one oversized frame
        assert not s.poll(1000)
    _wait_for(lambda: srv.server.counters["disconnects"] >= 1, timeout=5, what="the drop to be seen")
    with PSClient(srv.address, worker=0, server_timeout=30) as ps:
        welcome = ps.register(init={"w": np.zeros(10 * 2**20, np.float32)})          # 40 MiB, chunked
        assert welcome.tensors["w"].shape == (10 * 2**20,)


# -- push admission (--max-pushes-in-flight) ---------------------------------------------------------

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


def test_snapshot_flags_reach_the_store_and_a_checkpoint_hands_memory_back(tmp_path, monkeypatch):
    import paramserver.checkpointer as server_module
    calls = []
    monkeypatch.setattr(server_module, "release_free_memory", lambda: calls.append(1) or True)
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:*", snapshot_buffers=3, snapshot_wait=1.5,
                              checkpoint=str(tmp_path / "ckpt.pt")))
    assert srv.store.spares == 3 and srv.store.stall_s == 1.5
    srv.store.init(THETA)
    srv.write_checkpoint()
    assert calls == [1] and (tmp_path / "ckpt.pt").exists()
    srv.close()


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


def test_a_checkpoint_that_cannot_be_written_is_logged_and_the_server_keeps_serving(start_server, tmp_path,
                                                                                    monkeypatch):
    import paramserver.checkpointer as server_module
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, checkpoint=str(tmp_path / "c.pt"),
                       metrics=str(tmp_path / "m.json"))

    def full(path, state):
        raise OSError(28, "No space left on device")
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        monkeypatch.setattr(server_module, "save_checkpoint", full)
        srv.server.write_checkpoint()
        p = ps.pull()
        assert ps.push(GRAD, p.version, p.clock).meta["status"] == "applied"
    assert srv.server.counters["checkpoint_errors"] == 1 and not (tmp_path / "c.pt").exists()
    srv.stop()                                     # close(): the final checkpoint fails too, the metrics are written
    assert srv.server.counters["checkpoint_errors"] == 2 and (tmp_path / "m.json").exists()


def test_an_output_path_that_cannot_be_written_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    for flag in ("checkpoint", "metrics"):
        with pytest.raises(ConfigError, match=f"--{flag} .*cannot create its folder"):
            Server(ServerConfig(**{flag: str(tmp_path / "file" / "out")}))
        with pytest.raises(ConfigError, match=f"--{flag} .* is a folder"):
            Server(ServerConfig(**{flag: str(tmp_path)}))


def test_a_final_checkpoint_that_cannot_be_written_makes_the_server_exit_1(tmp_path):
    """Logged and counted while serving; but at the end a supervisor must not take it for a clean exit."""
    folder = tmp_path / "d"
    p = subprocess.Popen([sys.executable, "-m", "paramserver", "server", "--bind", "tcp://127.0.0.1:*",
                          "--num-workers", "1", "--mode", "async", "--checkpoint", str(folder / "c.pt")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        import select
        assert select.select([p.stdout], [], [], 120)[0], "the server never said where it listens"
        address = p.stdout.readline().split()[-1]
        with PSClient(address, worker=0, server_timeout=30) as ps:
            ps.register(init=THETA)
        folder.rmdir()
        folder.write_text("now a file: the checkpoint's folder cannot be made")
        with PSClient(address, server_timeout=30) as ps:
            ps.shutdown()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "the final checkpoint was not written" in err, err


def test_rejected_16_bit_pushes_with_made_up_names_leave_no_buffers(start_server):
    """Names and shapes are checked before 16-bit values are widened into buffers kept per name."""
    from common.protocol import encode_wire
    srv = start_server(num_workers=1, mode="async", optimizer="adam", lr=0.1)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=THETA)
        p = ps.pull()
        for i in range(5):
            with pytest.raises(ServerError, match="unknown parameter"):
                ps.push({f"made-up-{i}": encode_wire(np.ones(1000, np.float32), "bf16")}, p.version, p.clock)
    assert srv.server.store._widen_buf is None and srv.server.store.version == 0


def test_shared_memory_peers_are_bounded(monkeypatch):
    from common import shm
    monkeypatch.setattr(shm.ServerTransport, "MAX_PEERS", 3)
    t = shm.ServerTransport()
    for i in range(10):
        t.inbound(b"peer%d" % i, Message(MsgType.REGISTER, meta={"shm_offer": True}))
    t.inbound(b"peer7", Message(MsgType.PULL, meta={"shm": True}))    # heard again: the most recent
    t.inbound(b"peer10", Message(MsgType.REGISTER, meta={"shm_offer": True}))
    assert list(t.peers) == [b"peer9", b"peer7", b"peer10"] and t.peers[b"peer7"] is True
    t.close()


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


def test_a_push_accumulated_in_the_unfinished_step_is_accumulated_again_after_a_resume(tmp_path):
    """The checkpoint does not hold the unfinished sync step's gradients; a resend of a push it had answered
    "accumulated" must be accumulated again, not answered from the record (applied zero times)."""
    from common.protocol import ROLE_REQUESTS, new_session, routing_id
    ckpt = str(tmp_path / "c.pt")
    rid = routing_id(new_session(), ROLE_REQUESTS)
    first = RunningServer(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, checkpoint=ckpt)
    a = _raw_socket(first.address, rid)
    _ask(a, Message(MsgType.REGISTER, worker=0, seq=1, tensors=THETA))
    b = PSClient(first.address, worker=1, server_timeout=10)
    b.register()
    p = _ask(a, Message(MsgType.PULL, worker=0, seq=2))
    push = Message(MsgType.PUSH, worker=0, seq=3, clock=p.clock, version=p.version, tensors=GRAD)
    assert _ask(a, push).meta["status"] == "accumulated"
    first.stop()                                  # checkpoint with one pending gradient, which it does not hold
    b.close()
    a.close()
    second = RunningServer(num_workers=2, mode="sync", optimizer="sgd", lr=0.1, resume=ckpt)
    try:
        a = _raw_socket(second.address, rid)
        assert _ask(a, Message(MsgType.REGISTER, worker=0, seq=4)).type == MsgType.WELCOME
        counters = second.server.counters
        received, duplicates = counters["received"], counters["duplicates"]   # (restored from the checkpoint)
        again = _ask(a, push)                     # the resend of seq 3 (its ACK was lost in the crash)
        # handled as a new push (worker 1 is not back, so the step may complete with it alone)
        assert again.meta["status"] in ("accumulated", "applied") and counters["received"] == received + 1
        assert _ask(a, push).meta["status"] == again.meta["status"]   # a second resend: answered from the record
        assert counters["received"] == received + 1 and counters["duplicates"] == duplicates + 1
        assert counters["dropped:restart"] == 1            # the first handling's gradient, lost with the step
        a.close()
    finally:
        second.stop()


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
        assert server.divergence.held.get(0)                                   # nothing spent yet: the first pull samples
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


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_chunked_tensors_reuse_their_join_buffers(start_server, monkeypatch, mode):
    """A tensor over the chunk size is joined into a reused buffer on both sides: the server's join buffers
    stay at one per gradient it holds at once (async: 1; sync: one per worker until the step is applied),
    the client's at the pulls it holds (the last one while the next arrives), not one per message."""
    import common.protocol as protocol
    monkeypatch.setattr(protocol, "CHUNK_BYTES", 400)            # 100 float32 per chunk: "w" comes in 10
    theta = {"w": np.zeros(1000, np.float32), "b": np.zeros(3, np.float32)}
    grad = {"w": np.full(1000, 0.5, np.float32), "b": np.ones(3, np.float32)}
    n = 2 if mode == "sync" else 1
    srv = start_server(num_workers=n, mode=mode, optimizer="sgd", lr=0.1)
    clients = [PSClient(srv.address, worker=r, server_timeout=10) for r in range(n)]
    clients[0].register(init=theta)
    for ps in clients[1:]:
        ps.register()
    _pull_push_at_once(clients, grad, 5, timeout=60)
    assert srv.server.store.version == 5
    np.testing.assert_allclose(srv.server.store.theta["w"], -0.1 * 0.5 * 5, rtol=1e-6)   # (sync: mean of 2)
    assert srv.server.transport.joined.allocations == n + 1   # + the REGISTER's theta, joined before theta was known
    assert all(ps._joined.allocations <= 2 for ps in clients)
    # a peer's made-up tensor is joined for the one message and never kept (no memory held for it)
    with pytest.raises(ServerError, match="unknown parameter"):
        clients[0].push({"zzz": np.zeros(5000, np.float32)}, 0, 0)
    assert set(srv.server.transport.joined.buffers) == {("w", 4000)}
    for ps in clients:
        ps.close()
