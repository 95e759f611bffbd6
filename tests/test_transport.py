"""paramserver/transport.py: the socket side of the server: bounded memory for a client that never reads, the
frame limit, shared-memory peers, and the join buffers of chunked tensors."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import zmq

from common.config import ServerConfig
from common.protocol import CHUNK_BYTES, MAX_HEADER_BYTES, Message, MsgType, encode
from paramserver.metrics import PhaseTimes
from paramserver.transport import Transport, frame_limit
from tests.conftest import ROOT, wait_for
from tests.test_server import THETA, _ask, _free_port, _pull_push_at_once, _raw_socket
from worker.client import PSClient, ServerError

_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


def test_the_frame_limit_is_the_flag_else_thetas_largest_tensor_else_the_protocols_chunk():
    assert frame_limit(ServerConfig(max_message_mb=2), 1000) == 2 * 2**20
    assert frame_limit(ServerConfig(), 1000) == 1000 + MAX_HEADER_BYTES
    assert frame_limit(ServerConfig(), None) == frame_limit(ServerConfig(), 2 * CHUNK_BYTES)
    assert frame_limit(ServerConfig(), None) == CHUNK_BYTES + MAX_HEADER_BYTES


def test_what_is_not_a_request_gets_an_error_reply_counted_as_malformed():
    events = Counter()
    transport = Transport(ServerConfig(shm=False), zmq.Context.instance(), events, PhaseTimes())
    msg, error = transport.decode(b"peer", [b"\x00 not a header"])
    assert msg is None and error.type == MsgType.ERROR and error.meta["code"] == "malformed"
    msg, error = transport.decode(b"peer", encode(Message(MsgType.ACK, worker=0)))
    assert msg is None and error.meta["code"] == "not_a_request"
    msg, error = transport.decode(b"peer", encode(Message(MsgType.HEARTBEAT, worker=0, seq=1)))
    assert error is None and msg.type == MsgType.HEARTBEAT
    assert events == Counter({"malformed": 2})
    transport.close()


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
