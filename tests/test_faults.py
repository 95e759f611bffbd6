"""Faults: dead workers, a killed server, lost and duplicated messages, auth, load.

Nothing here needs an optional package: the protocol fuzzer (hypothesis) is in test_fuzz.py."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from common.config import WorkerConfig
from common.protocol import Message, MsgType, encode
from common.checkpoint import load_checkpoint
from paramserver.store import theta_crc32
from tests.conftest import ROOT, counts_add_up, wait_for as _wait_for, worker_process
from worker.client import PSClient, ServerUnavailable

ENV = dict(os.environ, PYTHONPATH=ROOT)


def _workers(address, n, steps, **kw):
    kw.setdefault("job", "mlp")
    kw.setdefault("request_timeout", 0.3)
    return [WorkerConfig(server=address, rank=r, num_workers=n, batch_size=8, steps=steps, eval_every=0,
                         log_every=0, threads=1, heartbeat=0.2, **kw) for r in range(n)]


# -- a worker killed with SIGKILL -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_kill_one_of_three_workers(start_server, mode):
    srv = start_server(num_workers=3, mode=mode, staleness=2 if mode == "ssp" else None, optimizer="sgd", lr=0.05,
                       worker_timeout=1.0)
    procs = [worker_process(c) for c in _workers(srv.address, 3, 400)]
    _wait_for(lambda: srv.server.store.version >= 30, what="training to start")
    procs[2].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    _wait_for(lambda: srv.server.counters["dead"] == 1, timeout=30, what="the dead worker to be noticed")
    detected = time.monotonic() - t_kill
    for p in procs[:2]:
        assert p.wait(timeout=120) == 0            # the survivors finish
    st = srv.server.status()
    assert st["workers"]["2"]["state"] == "dead"
    assert st["workers"]["0"]["state"] == st["workers"]["1"]["state"] == "left"
    counts_add_up(st)
    if mode == "sync":
        assert srv.server.policy.step == 400       # every survivor's 400 pushes became steps
    print(f"\n{mode}: dead worker detected after {detected:.2f}s")


# -- the server killed with SIGKILL and resumed ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_proc(port, ckpt, log, *extra):
    args = [sys.executable, "-m", "paramserver", "server", "--bind", f"tcp://127.0.0.1:{port}", "--num-workers",
            "2", "--mode", "sync", "--optimizer", "momentum", "--lr", "0.05", "--checkpoint", str(ckpt),
            "--checkpoint-every", "0.2", "--worker-timeout", "30", *extra]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def test_kill_server_and_resume(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    ckpt = tmp_path / "ckpt.pt"
    server = _server_proc(port, ckpt, tmp_path / "server1.log")
    cfgs = _workers(address, 2, 1500, server_timeout=120)
    procs = [worker_process(c, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{c.rank}.log", "w"))
             for c in cfgs]

    def version():
        with PSClient(address, server_timeout=2, request_timeout=0.5) as ps:
            return ps.status()["version"]

    _wait_for(lambda: ckpt.exists() and version() >= 100, what="a checkpoint mid-run")
    server.send_signal(signal.SIGKILL)
    server.wait()
    t_kill = time.monotonic()
    saved = load_checkpoint(str(ckpt))
    (tmp_path / "resume.pt").write_bytes(ckpt.read_bytes())
    assert all(p.poll() is None for p in procs)      # the workers wait for the server, they do not die
    server = _server_proc(port, ckpt, tmp_path / "server2.log", "--resume", str(tmp_path / "resume.pt"))
    try:
        for p in procs:
            assert p.wait(timeout=180) == 0          # training completes; nobody restarted a worker
        recovered = time.monotonic() - t_kill
        log = (tmp_path / "server2.log").read_text()
        m = re.search(r"resumed from .* at version (\d+) \(step (\d+)\), theta crc32 ([0-9a-f]{8})", log)
        assert m, log
        assert int(m.group(1)) == saved["version"]
        assert m.group(3) == theta_crc32(saved["theta"])      # theta after resume == the checkpoint
        with PSClient(address, server_timeout=5) as ps:
            st = ps.status()
        assert st["version"] > saved["version"]
        counts_add_up(st)
        reregistered = sum("registering again" in (tmp_path / f"w{r}.log").read_text() for r in range(2))
        assert reregistered == 2
        print(f"\nserver killed at version >= {saved['version']}, resumed; workers finished {recovered:.1f}s "
              f"after the kill; final version {st['version']}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    final = load_checkpoint(str(ckpt))                   # SIGTERM wrote a last checkpoint
    assert final["version"] == st["version"]


# -- lost and duplicated messages ----------------------------------------------------------------

def test_lost_and_duplicated_messages_do_not_change_sync_theta(start_server):
    thetas, stats = [], []
    for drop, dup in ((0.0, 0.0), (0.15, 0.15)):
        srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.1)
        cfgs = _workers(srv.address, 2, 40, seed=4, fault_drop=drop, fault_dup=dup, request_timeout=0.05)
        procs = [worker_process(c) for c in cfgs]
        for p in procs:
            assert p.wait(timeout=120) == 0
        st = srv.server.status()
        counts_add_up(st)
        thetas.append({n: t.copy() for n, t in srv.server.store.theta.items()})
        stats.append(st["counters"])
    assert stats[1].get("duplicates", 0) > 0             # resends and duplicates really happened
    assert stats[0]["applied"] == stats[1]["applied"] == 80
    for name in thetas[0]:
        np.testing.assert_array_equal(thetas[0][name], thetas[1][name])


# -- authentication ------------------------------------------------------------------------------

def test_curve_auth_admits_only_listed_keys(start_server, tmp_path):
    from common.security import make_keys
    keys = make_keys(str(tmp_path / "keys"), ("server", "client"))
    rogue = make_keys(str(tmp_path / "rogue"), ("server", "client"))
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1,
                       curve_secret=keys["server"][1], auth=str(tmp_path / "keys" / "clients"))
    before = theta_crc32(srv.server.store.theta)
    # a client with a key the server does not list: never gets an answer, changes nothing
    with PSClient(srv.address, worker=0, request_timeout=0.2, server_timeout=1.5,
                  curve_server=keys["server"][0], curve_secret=rogue["client"][1]) as bad:
        with pytest.raises(ServerUnavailable):
            bad.register(init={"w": np.ones(3, np.float32)})
    # a plain-text client: no answer either
    with PSClient(srv.address, worker=0, request_timeout=0.2, server_timeout=1.5) as plain:
        with pytest.raises(ServerUnavailable):
            plain.status()
    assert not srv.server.store.initialized and theta_crc32(srv.server.store.theta) == before
    assert srv.server.status()["counters"]["handshake_failures"] >= 1     # refused, and counted
    # with the right key it trains
    cfg = _workers(srv.address, 1, 30, job="linear", curve_server=keys["server"][0],
                   curve_secret=keys["client"][1])[0]
    assert worker_process(cfg).wait(timeout=120) == 0
    assert srv.server.store.version == 30
    counts_add_up(srv.server.status())


# -- load ------------------------------------------------------------------------------------------

def test_load_32_workers_no_update_lost_or_doubled():
    from paramserver.bench.load import LoadConfig, print_load, run_load
    r = run_load(LoadConfig(workers=32, seconds=4.0, size=256, drop=0.02, dup=0.02))
    print_load(r)
    assert r["applied_acked"] > 32
    assert r["applied_acked"] == r["server_applied"] == r["server_version"]
    assert r["theta_exact"]
    assert r["duplicates"] > 0
    counts_add_up({"counters": r["counters"], "pending_gradients": 0})


# -- a worker that stalls, is declared dead, and comes back ---------------------------------------

def test_paused_worker_is_declared_dead_then_rejoins(start_server):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05, worker_timeout=1.0)
    procs = [worker_process(c) for c in _workers(srv.address, 2, 600)]
    _wait_for(lambda: srv.server.store.version >= 20, what="training to start")
    procs[1].send_signal(signal.SIGSTOP)                   # frozen: no heartbeats, no pushes
    _wait_for(lambda: srv.server.counters["dead"] == 1, timeout=30, what="the stalled worker to be dead")
    v_dead = srv.server.store.version
    _wait_for(lambda: srv.server.store.version >= v_dead + 20, what="the live worker to go on alone")
    procs[1].send_signal(signal.SIGCONT)
    _wait_for(lambda: srv.server.workers[1].alive, timeout=30, what="the worker to rejoin")
    assert srv.server.policy.last_clock[1] >= v_dead + 20   # it rejoined at the current step, not its old one
    for p in procs:
        assert p.wait(timeout=120) == 0
    counts_add_up(srv.server.status())


def test_min_workers_holds_sync_and_says_so(start_server, caplog):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05, worker_timeout=1.0, min_workers=2,
                       log_level="info")
    procs = [worker_process(c) for c in _workers(srv.address, 2, 600)]
    _wait_for(lambda: srv.server.store.version >= 20, what="training to start")
    procs[1].send_signal(signal.SIGKILL)
    _wait_for(lambda: srv.server.counters["dead"] == 1, timeout=30, what="the dead worker")
    # the survivor's next pull is held (no sleep-and-hope: once it is held, nothing can move)
    _wait_for(lambda: len(srv.server.pending) == 1, timeout=30, what="the survivor's pull to be held")
    held_at = srv.server.store.version
    time.sleep(0.5)                                        # a chance for a wrong server to move on
    assert srv.server.store.version == held_at and len(srv.server.pending) == 1   # below --min-workers
    assert any("below --min-workers 2" in r.getMessage() for r in caplog.records)
    # a replacement worker with the same rank restores the quorum and training goes on
    replacement = worker_process(_workers(srv.address, 2, 50)[1])
    assert replacement.wait(timeout=120) == 0
    assert srv.server.store.version > held_at
    procs[0].kill()


def test_oversized_message_is_refused_and_theta_kept(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1, max_message_mb=0.01)
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init={"w": np.zeros(16, np.float32)})
    before = theta_crc32(srv.server.store.theta)
    with zmq.Context.instance().socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.address)
        s.send_multipart(encode(Message(MsgType.PUSH, worker=0, seq=99, tensors={"w": np.zeros(10**5, np.float32)})))
        assert not s.poll(1000)                           # ZeroMQ drops the peer: no reply, nothing applied
    _wait_for(lambda: srv.server.counters["disconnects"] >= 1, timeout=5, what="the drop to be seen")
    with PSClient(srv.address, server_timeout=5) as ps:
        st_ = ps.status()
    assert st_["theta_crc32"] == before and st_["version"] == 0
