"""paramserver/checkpointer.py: checkpoints and resume: the dedup record survives a restart, the resume barrier,
the flags a resume must match, a checkpoint that cannot be written, and what a resume forgets (a push held in the
unfinished step). The server's own event counters survive a resume as before."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest

from common.checkpoint import load_checkpoint
from common.config import ConfigError, ServerConfig
from common.protocol import Message, MsgType
from paramserver.checkpointer import is_server_event
from paramserver.server import Server
from tests.conftest import ROOT, RunningServer, wait_for
from tests.test_server import GRAD, THETA, _ask, _free_port, _raw_socket
from worker.client import PSClient

_wait_for = functools.partial(wait_for, timeout=30.0, every=0.02)


def test_the_servers_events_survive_a_resume_on_its_own_counter(tmp_path):
    """The checkpoint keeps one `counters` map (as before the server had its own); a resume puts the server's
    events back on the server's counter and the gradients on the policy's."""
    ckpt = str(tmp_path / "c.pt")
    cfg = dict(bind="tcp://127.0.0.1:*", num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    srv = Server(ServerConfig(checkpoint=ckpt, **cfg))
    srv.store.init(THETA)
    srv.events["dead"] += 2
    srv.events["refused:identity"] += 1
    srv.policy.counters["received"] += 3
    assert srv.write_checkpoint()
    assert load_checkpoint(ckpt)["counters"] == {"received": 3, "dead": 2, "refused:identity": 1}
    again = Server(ServerConfig(resume=ckpt, **cfg))
    assert again.events == Counter({"dead": 2, "refused:identity": 1})
    assert again.policy.counters == Counter({"received": 3})
    assert again.status()["counters"] == {"received": 3, "dead": 2, "refused:identity": 1}
    assert is_server_event("refused:not_admin") and not is_server_event("dropped:late")
    assert is_server_event("an_event_added_later") and not any(map(is_server_event, ("received", "applied", "updates")))


def test_the_merged_counters_are_copied_while_the_server_thread_counts():
    """status() may be called from another thread (tests, an in-process tool) while the server thread counts a
    key it has never counted: the merged view copies each counter before walking it."""
    import threading
    from paramserver.metrics import CounterView
    policy, events, stop, errors = Counter(), Counter(), threading.Event(), []

    def count():
        i = 0
        while not stop.is_set():
            events[f"refused:code{i % 5000}"] += 1
            policy[f"dropped:{i % 5000}"] += 1
            i += 1
            if i % 5000 == 0:
                events.clear(), policy.clear()

    view = CounterView(lambda: policy, lambda: events)
    t = threading.Thread(target=count, daemon=True)
    t.start()
    try:
        for _ in range(2000):
            try:
                copied = view.copy()
                assert isinstance(copied, dict) and dict(view) is not None and len(view) >= 0
            except RuntimeError as exc:   # "dictionary changed size during iteration"
                errors.append(exc)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:1]
    policy.clear(), events.clear()   # (what the thread counted last stays)
    policy.update(applied=2)
    events.update(dead=1, applied=1)
    assert view.copy() == {"applied": 3, "dead": 1} and view["applied"] == 3 and view["nothing"] == 0


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
