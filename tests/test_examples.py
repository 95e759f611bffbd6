"""The scripts in examples/ run as documented (examples/numpy_worker.py runs in test_api.py, examples/cnn_entry.py
in test_entry.py), and the PyTorch API leaves the job when its process is interrupted."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

EXAMPLE = os.path.join(ROOT, "examples", "cnn_api.py")


def _worker_env(address: str, rank: int, n: int) -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PS_SERVER=address, PS_RANK=str(rank),
                PS_NUM_WORKERS=str(n))


def test_cnn_api_example_trains_with_two_workers(start_server):
    """examples/cnn_api.py (a user's script with the README's five changed lines), two processes, identity from
    PS_SERVER / PS_RANK / PS_NUM_WORKERS: both finish, and the held-out loss falls."""
    srv = start_server(num_workers=2, mode="sync", lr=0.01)
    procs = [subprocess.Popen([sys.executable, EXAMPLE, "--epochs", "1"], env=_worker_env(srv.address, r, 2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        m = re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out)
        assert m, out
        assert float(m.group(2)) < 0.7 * float(m.group(1)), out
    assert srv.server.store.version == 32                       # 1024 samples per shard / batch 32
    assert all(srv.server.workers[r].left for r in range(2))    # opt.close() said LEAVE


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_worker_leaves_the_job(start_server, sig):
    """Ctrl-C (SIGINT) or SIGTERM in the middle of the user's loop: the worker says LEAVE on its way out (no
    `with` block in the script), so the server stops waiting for it at once instead of after --worker-timeout."""
    srv = start_server(num_workers=1, mode="sync", lr=0.01, worker_timeout=300)
    p = subprocess.Popen([sys.executable, EXAMPLE, "--epochs", "1000"], env=_worker_env(srv.address, 0, 1),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while srv.server.store.version < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert srv.server.store.version >= 3, p.communicate(timeout=5)[0] if p.poll() is not None else "no progress"
    p.send_signal(sig)
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0, out
    state = srv.server.workers[0]
    assert state.left, f"the worker did not leave; output:\n{out}"
