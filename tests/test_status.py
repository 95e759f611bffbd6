"""`paramserver status` and `paramserver stop` against a live server; what the server logs about peers."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from common.config import WorkerConfig
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture: `paramserver ARGS` in this process)
from tests.conftest import ROOT, RunningServer, run_worker_thread

ENV = dict(os.environ, PYTHONPATH=ROOT)


def ps(*args):
    """`paramserver ARGS` through a real process (stop's end-to-end check; status's is in test_cli.py)."""
    return subprocess.run([sys.executable, "-m", "paramserver", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)


def _train(address, n=2, steps=6):
    results: dict = {}
    threads = [run_worker_thread(WorkerConfig(server=address, rank=r, num_workers=n, job="mlp", steps=steps,
                                              eval_every=0, log_every=0, threads=1), results) for r in range(n)]
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(results[r], dict) for r in range(n)), results


def test_status_text_shows_what_the_readme_promises(cli, start_server):
    srv = start_server(num_workers=2, mode="ssp", staleness=2, optimizer="sgd", lr=0.05)
    _train(srv.address)
    r = cli("status", srv.address)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"theta crc32 {srv.server.store.checksum()}" in out
    assert "handling ms per message: p50" in out and "train loss 0." in out
    assert "server thread " in out and "% busy; busy " in out and "update " in out   # where its time went
    assert "clocks 6..6" in out and "(bound 2)" in out and "step 0" not in out   # ssp has no sync step
    assert "checkpoint: none written yet" in out


def test_status_after_a_resume_names_the_resumed_checkpoint(cli, tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    first = RunningServer(num_workers=1, mode="async", checkpoint=ckpt)
    _train(first.address, n=1, steps=3)
    first.stop()
    second = RunningServer(num_workers=1, mode="async", resume=ckpt)
    try:
        r = cli("status", second.address)
        assert r.returncode == 0, r.stderr
        assert f"resumed from {ckpt} at version 3" in r.stdout and "version 3" in r.stdout
    finally:
        second.stop()


def test_stop_sends_shutdown_and_the_server_checkpoints(tmp_path):
    srv = RunningServer(num_workers=1, mode="async", checkpoint=str(tmp_path / "c.pt"))
    try:
        _train(srv.address, n=1, steps=2)
        r = ps("stop", srv.address)
        assert r.returncode == 0 and "acknowledged SHUTDOWN" in r.stdout, r.stderr
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()
    finally:
        srv.stop()
    assert (tmp_path / "c.pt").exists()
    r = ps("stop", "tcp://127.0.0.1:9", "--timeout", "1")
    assert r.returncode == 1 and "no answer" in r.stderr and "Traceback" not in r.stderr


def test_stop_with_a_shard_list_stops_every_shard_even_past_one_that_is_gone(cli, tmp_path):
    a = RunningServer(num_workers=1, mode="async", checkpoint=str(tmp_path / "a.pt"))
    b = RunningServer(num_workers=1, mode="async", checkpoint=str(tmp_path / "b.pt"))
    try:
        r = cli("stop", f"{a.address},tcp://127.0.0.1:9,{b.address}", "--curve-server", "a.key,nope.key,b.key",
                "--curve-secret", "ops.key_secret")
        assert r.returncode == 2 and "no such key file" in r.stderr, r.stderr   # a missing key: nothing sent
        assert a.thread.is_alive() and b.thread.is_alive()
        r = cli("stop", f"{a.address},tcp://127.0.0.1:9,{b.address}", "--timeout", "2")
        assert r.returncode == 1 and "tcp://127.0.0.1:9: no answer" in r.stderr, r.stderr   # the missing one named
        assert f"{a.address} acknowledged" in r.stdout and f"{b.address} acknowledged" in r.stdout   # ... the rest stop
        for s in (a, b):
            s.thread.join(timeout=30)
            assert not s.thread.is_alive()
    finally:
        a.stop()
        b.stop()


def test_routine_disconnects_are_quiet_and_an_idle_server_says_so(cli, start_server, caplog):
    caplog.set_level(logging.DEBUG, logger="paramserver.server")
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05)
    _train(srv.address)
    assert cli("status", srv.address).returncode == 0
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("all 2 workers have left" in r.getMessage() for r in caplog.records):
        time.sleep(0.2)
    assert any("all 2 workers have left" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    time.sleep(1.0)   # let the disconnect events arrive
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert disconnects and all(r.levelno == logging.DEBUG for r in disconnects)
    assert srv.server.counters["disconnects"] >= 1
