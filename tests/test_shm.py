"""The same-host shared-memory transport (common/shm.py, worker/shmclient.py): round trip, fallback, exactness."""
from __future__ import annotations

import os

import numpy as np
import pytest

from common import shm
from common.config import WorkerConfig
from common.protocol import ProtocolError
from tests.conftest import worker_process
from worker.client import PSClient
from worker.shmclient import ShmClient

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


def _params():
    rng = np.random.default_rng(1)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def test_segment_round_trip_and_seqlock():
    theta = _params()
    pub = shm.ThetaSegment.create({n: [t.dtype.name, list(t.shape)] for n, t in theta.items()})
    try:
        reader = shm.ThetaReader.attach(pub.info())
        ref = pub.publish(7, theta)
        got = reader.read(ref)
        assert all(np.array_equal(got[n], theta[n]) for n in theta)
        assert pub.publish(7, theta) == ref                 # once per version
        for v in range(8, 8 + shm.SLOTS):                  # the slot is rewritten SLOTS versions later
            pub.publish(v, {n: t + v for n, t in theta.items()})
        assert reader.read(ref) is None                    # ... and the reader notices, never returns mixed data
        assert shm.ThetaReader.attach({**pub.info(), "token": "0" * 16}) is None   # another server's segment
        assert shm.ThetaReader.attach({**pub.info(), "name": "pst-nonexistent-0"}) is None  # another host
        reader.close()
    finally:
        pub.close()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, pub.seg.name))   # the creator removes it


def test_a_slot_rewritten_during_the_copy_is_noticed(monkeypatch):
    """The seqlock's second look: the server republishes into the slot while the reader is copying it out
    (here: between the first and the second tensor's copy); the reader returns None, never a mix of versions."""
    theta = _params()
    pub = shm.ThetaSegment.create({n: [t.dtype.name, list(t.shape)] for n, t in theta.items()})
    try:
        reader = shm.ThetaReader.attach(pub.info())
        ref = pub.publish(7, theta)
        real_copyto, calls = np.copyto, []

        def copy_then_overwrite(dst, src, **kw):
            real_copyto(dst, src, **kw)
            calls.append(1)
            if len(calls) == 1:   # the slot comes round again while the reader is mid-copy
                for v in range(8, 8 + shm.SLOTS):
                    pub.publish(v, {n: t + v for n, t in theta.items()})
        out = {n: np.empty_like(t) for n, t in theta.items()}
        monkeypatch.setattr(shm.np, "copyto", copy_then_overwrite)
        assert reader.read(ref, out) is None
        monkeypatch.setattr(shm.np, "copyto", real_copyto)
        assert reader.read(pub.publish(20, theta), out) is not None   # a quiet slot reads fine
        reader.close()
    finally:
        pub.close()


def test_gradient_segment_is_bounds_checked():
    g = _params()
    writer = shm.GradientWriter({n: [t.dtype.name, list(t.shape)] for n, t in g.items()})
    readers = shm.GradientReaders()
    try:
        ref = writer.write(g)
        got = readers.read(ref)
        assert all(np.array_equal(got[n], g[n]) for n in g)
        with pytest.raises(ProtocolError, match="outside"):
            readers.read({"name": ref["name"], "specs": [["w", "float32", [10 ** 6], 0]]})
        with pytest.raises(ProtocolError, match="not a gradient segment"):
            readers.read({"name": "pst-1-abc", "specs": []})
        with pytest.raises(ProtocolError, match="not one of ours"):
            readers.read({"name": "psg-../../etc/passwd", "specs": []})
    finally:
        readers.close()
        writer.close()


def test_gradient_buffers_are_reused_only_when_nothing_holds_them():
    """The server's copy of a pushed gradient goes into a per-segment buffer that is reused once released; a
    gradient still held (a sync step waiting) keeps its values however many pushes follow."""
    import torch
    g = _params()
    writer = shm.GradientWriter({n: [t.dtype.name, list(t.shape)] for n, t in g.items()})
    readers = shm.GradientReaders()
    try:
        first = readers.read(writer.write(g))
        held = torch.from_numpy(first["w"])             # as the apply does: a tensor over the array
        del first
        for k in range(2, 2 + 2 * shm.GradientReaders.POOL):
            got = readers.read(writer.write({n: t * k for n, t in g.items()}))
            assert all(np.array_equal(got[n], g[n] * k) for n in g)
            assert torch.equal(held, torch.from_numpy(g["w"]))   # never overwritten while held
            del got
        assert readers.allocations == 2                  # the held one, and one reused for every other push
        del held
        readers.read(writer.write(g))
        assert readers.allocations == 2                  # released: reused
    finally:
        readers.close()
        writer.close()


def test_one_gradient_buffer_serves_every_worker_when_each_is_let_go_of():
    """ssp/async: each gradient is applied and released before the next is read, so the copies of several
    workers' gradients share one buffer; one held by a sync step makes another; the pool shrinks when workers go."""
    g = _params()
    layout = {n: [t.dtype.name, list(t.shape)] for n, t in g.items()}
    writers = [shm.GradientWriter(layout) for _ in range(4)]
    readers = shm.GradientReaders()
    try:
        for k in range(3):
            for i, w in enumerate(writers):
                got = readers.read(w.write({n: t * (k + i) for n, t in g.items()}))
                assert all(np.array_equal(got[n], g[n] * (k + i)) for n in g)
                del got
        assert readers.allocations == 1 and len(readers.pool) == 1
        held = [readers.read(w.write(g)) for w in writers]     # a sync step: all four held at once
        assert readers.allocations == 4 and len(readers.pool) == 4
        assert all(np.array_equal(h[n], g[n]) for h in held for n in g)
        del held
        for w in writers[:3]:
            readers.forget(w.seg.name)
        assert len(readers.pool) == shm.GradientReaders.POOL
    finally:
        readers.close()
        for w in writers:
            w.close()


def test_pull_and_push_go_through_shared_memory(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5)
    params = _params()
    with ShmClient(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        assert ps.transport == "shm"
        p = ps.pull()
        assert all(np.array_equal(p.tensors[n], params[n]) for n in params)
        grads = {n: np.ones_like(t) for n, t in params.items()}
        ack = ps.push(grads, version=p.version, clock=p.clock)
        assert ack.meta["status"] == "applied"
        p2 = ps.pull()
        assert p2.version == 1
        assert all(np.allclose(p2.tensors[n], params[n] - 0.5) for n in params)
        assert ps.stats["shm_pulls"] == 2 and ps.stats["shm_pushes"] == 1
    theta = srv.server.store.theta
    assert all(np.allclose(theta[n], params[n] - 0.5) for n in params)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_copy_checked_copies_and_finds_every_non_finite_value(dtype, bad, monkeypatch):
    """The copy out of shared memory is checked block by block (small blocks here): a NaN or Inf anywhere,
    the first or last value of a block included, is found; the copy is exact either way."""
    monkeypatch.setattr(shm, "COPY_BLOCK", 7)
    for where in (0, 6, 7, 40, 99):
        src = np.random.default_rng(where).standard_normal(100).astype(dtype).reshape(4, 25)
        if bad is not None:
            src.reshape(-1)[where] = bad
        dst = np.zeros_like(src)
        assert shm.copy_checked(dst, src) is (bad is None)
        assert np.array_equal(dst, src, equal_nan=True)


def test_copy_checked_copies_non_contiguous_arrays_too():
    src = np.arange(12, dtype=np.float32).reshape(3, 4).T           # a transposed view
    dst = np.zeros((8, 3), np.float32)[::2]                          # every other row
    assert shm.copy_checked(dst, src) is True and np.array_equal(dst, src)
    src[1, 1] = np.nan
    assert shm.copy_checked(dst, src) is False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_copy_checked_refuses_values_beyond_max_gradient(dtype):
    from common.protocol import MAX_GRADIENT
    src = np.zeros(100, dtype)
    src[50] = MAX_GRADIENT
    assert shm.copy_checked(np.empty_like(src), src) is True
    src[50] = -2 * MAX_GRADIENT
    assert shm.copy_checked(np.empty_like(src), src) is False


def test_a_non_finite_gradient_in_shared_memory_is_rejected(start_server, monkeypatch):
    """A NaN written into the worker's segment is refused (bad_gradient) and theta stays as it was. The
    check made while copying it out is the one that counts (the separate check is disabled here)."""
    from paramserver import store
    from worker.client import ServerError
    monkeypatch.setattr(store, "_finite", lambda g: True)
    srv = start_server(num_workers=1, mode="async", optimizer="adam", lr=0.5)
    params = _params()
    with ShmClient(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        p = ps.pull()
        grads = {n: np.ones_like(t) for n, t in params.items()}
        grads["w"][63, 32] = np.nan
        with pytest.raises(ServerError, match="non-finite"):
            ps.push(grads, version=p.version, clock=p.clock)
        assert ps.stats["shm_pushes"] == 0 and ps.writer is not None   # it went through shared memory
        grads["w"][63, 32] = 1.0
        assert ps.push(grads, version=p.version, clock=p.clock).meta["status"] == "applied"
    assert srv.server.policy.counters["dropped:invalid"] == 1 and srv.server.store.version == 1


class _CountingSocket:
    """A client socket that counts the bytes it sends and receives (everything else passes through)."""

    def __init__(self, sock):
        self.sock, self.sent, self.received = sock, 0, 0

    def send_multipart(self, frames, **kw):
        self.sent += sum(len(f.buffer if hasattr(f, "buffer") else memoryview(f).cast("B")) for f in frames)
        return self.sock.send_multipart(frames, **kw)

    def recv_multipart(self, **kw):
        frames = self.sock.recv_multipart(**kw)
        self.received += sum(len(f.buffer if hasattr(f, "buffer") else f) for f in frames)
        return frames

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("client", [ShmClient, PSClient])
def test_shared_memory_keeps_theta_and_gradients_off_the_socket(start_server, client):
    """Over shm a step puts only small messages on the socket (the server reads the gradient from the worker's
    segment and the worker reads theta from the server's), and the result is the same as over tcp."""
    n = 1 << 18                                                   # 1 MB of float32 each way per step
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5)
    params = {"w": np.arange(n, dtype=np.float32)}
    with client(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        ps.sock = counting = _CountingSocket(ps.sock)
        steps = 3
        for _ in range(steps):
            p = ps.pull()
            ps.push({"w": np.ones(n, np.float32)}, version=p.version, clock=p.clock)
        p = ps.pull()
        ps.sock = counting.sock
    assert np.array_equal(p.tensors["w"], params["w"] - 0.5 * steps)
    assert np.array_equal(srv.server.store.theta["w"], params["w"] - 0.5 * steps)
    payload = 4 * n * steps
    if client is ShmClient:
        assert counting.sent < 4096 * steps and counting.received < 4096 * (steps + 1)
    else:                                                          # the same loop over tcp moves theta both ways
        assert counting.sent > payload and counting.received > payload


def test_falls_back_to_the_socket(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5, shm=False)   # no shm on the server
    params = _params()
    with ShmClient(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        assert ps.transport == "tcp"
        p = ps.pull()
        ps.push({n: np.ones_like(t) for n, t in params.items()}, version=p.version, clock=p.clock)
        assert ps.stats["shm_pulls"] == ps.stats["shm_pushes"] == 0
    srv2 = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5)
    with ShmClient(srv2.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        ps.reader.close()                      # as if the server's segment were on another host
        ps.reader = shm.ThetaReader.attach({**srv2.server.transport.shm.theta.info(), "token": "f" * 16})
        assert ps.transport == "tcp"
        p = ps.pull()
        assert all(np.array_equal(p.tensors[n], params[n]) for n in params) and ps.stats["shm_pulls"] == 0
    with PSClient(srv2.address, worker=1, request_timeout=1, server_timeout=10) as ps:   # a plain client
        welcome = ps.register(init=params)
        assert "shm" not in welcome.meta and ps.pull().tensors


def test_sync_over_shared_memory_equals_sync_over_tcp(start_server, tmp_path):
    """The transport does not change a bit of theta (2 worker processes, sync)."""
    import json
    thetas = []
    for flag in (True, False):
        srv = start_server(num_workers=2, mode="sync", optimizer="adam", lr=0.01)
        out = tmp_path / str(flag)
        cfgs = [WorkerConfig(server=srv.address, rank=r, num_workers=2, job="mlp", batch_size=8, steps=5,
                             eval_every=0, log_every=0, shard="hash", seed=3, threads=1, shm=flag, out=str(out))
                for r in range(2)]
        procs = [worker_process(c) for c in cfgs]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert srv.server.store.version == 5
        stats = json.loads((out / "worker0.json").read_text())["client"]
        assert stats.get("shm_pulls", 0) == (5 if flag else 0) and stats.get("shm_pushes", 0) == (5 if flag else 0)
        thetas.append({n: t.copy() for n, t in srv.server.store.theta.items()})
    assert all(np.array_equal(thetas[0][n], thetas[1][n]) for n in thetas[0])


def test_a_full_dev_shm_falls_back_to_the_socket(start_server, monkeypatch):
    """posix_fallocate reserves the pages: a /dev/shm too small for theta means the socket, not SIGBUS."""
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5)
    params = _params()
    with ShmClient(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        welcome = ps.register(init=params)
        assert "shm" not in welcome.meta and ps.transport == "tcp"
        p = ps.pull()
        ps.push({n: np.ones_like(t) for n, t in params.items()}, version=p.version, clock=p.clock)
    assert srv.server.store.version == 1 and "No space left" in srv.server.transport.shm.failed
    assert not [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"pst-{os.getpid()}-")]   # nothing left behind


def test_no_room_for_the_gradient_segment_pushes_over_the_socket(start_server, monkeypatch):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.5)
    params = _params()
    with ShmClient(srv.address, worker=0, request_timeout=1, server_timeout=10) as ps:
        ps.register(init=params)
        assert ps.transport == "shm"

        def full(fd, offset, size):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "posix_fallocate", full)
        p = ps.pull()
        ack = ps.push({n: np.ones_like(t) for n, t in params.items()}, version=p.version, clock=p.clock)
        assert ack.meta["status"] == "applied" and not ps.push_shm and ps.stats["shm_pushes"] == 0
    assert all(np.allclose(srv.server.store.theta[n], params[n] - 0.5) for n in params)


def test_segments_of_dead_processes_are_swept():
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)                      # a process id that no longer runs
    stale = os.path.join(shm.SHM_DIR, f"psg-{pid}-0123456789abcdef")
    open(stale, "wb").close()
    mine = shm.GradientWriter({"w": ["float32", [4]]})    # creating a segment sweeps
    try:
        assert not os.path.exists(stale)
        assert os.path.exists(os.path.join(shm.SHM_DIR, mine.seg.name))   # a live process's segment stays
    finally:
        mine.close()
