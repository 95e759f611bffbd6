"""Shared fixtures: an in-process server on an ephemeral loopback port, and worker helpers."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.config import ServerConfig, WorkerConfig  # noqa: E402
from paramserver.server import Server  # noqa: E402


class RunningServer:
    """A Server whose loop runs in a thread; stop() ends it and writes its outputs."""

    def __init__(self, **overrides):
        overrides.setdefault("bind", "tcp://127.0.0.1:*")
        overrides.setdefault("log_level", "warning")
        self.server = Server(ServerConfig(**overrides))
        self.address = self.server.bind()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.stop()
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture
def start_server():
    servers = []

    def start(**overrides) -> RunningServer:
        s = RunningServer(**overrides)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
    for s in servers:   # the README's promise, checked after every test that ran a server
        counts_add_up(s.server.status())


def worker_process(cfg: WorkerConfig, **popen) -> subprocess.Popen:
    """Start `paramserver worker` for cfg in a subprocess, the cluster's way (its output: as `popen` says)."""
    from paramserver.launch import launch_worker
    return launch_worker(cfg, **popen)


def run_worker_thread(cfg: WorkerConfig, results: dict) -> threading.Thread:
    from worker.train import run_worker

    def target():
        try:
            results[cfg.rank] = run_worker(cfg)
        except BaseException as exc:  # surfaced by the test
            results[cfg.rank] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def counts_add_up(status: dict) -> None:
    """Every gradient the server received was applied, dropped (with a reason) or is pending."""
    c = status["counters"]
    dropped = sum(v for k, v in c.items() if k.startswith("dropped:"))
    assert c.get("received", 0) == c.get("applied", 0) + dropped + status["pending_gradients"], c


def wait_for(pred, timeout: float = 60.0, what: str = "condition", every: float = 0.05) -> None:
    """Poll `pred` until it holds; a hang guard, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
