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
    procs = [subprocess.Popen([sys.executable, EXAMPLE, "--epochs", "2"], env=_worker_env(srv.address, r, 2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        m = re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out)
        assert m, out
        assert float(m.group(2)) < 0.7 * float(m.group(1)), out
    assert srv.server.store.version == 64                       # 2 epochs x 1024 samples per shard / batch 32
    assert all(srv.server.workers[r].left for r in range(2))    # opt.close() said LEAVE


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_worker_leaves_the_job(start_server, sig):
    """Ctrl-C (SIGINT) or SIGTERM in the middle of the user's loop: the worker says LEAVE on its way out (no
    `with` block in the script), so the server stops waiting for it at once instead of after --worker-timeout."""
    srv = start_server(num_workers=1, mode="sync", lr=0.01, worker_timeout=300)
    # as started from a terminal: a process started by a background job (`cmd &`) inherits SIGINT ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt. A signal with a handler here is reset to its default
    # in the child by exec
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen([sys.executable, EXAMPLE, "--epochs", "1000"], env=_worker_env(srv.address, 0, 1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.monotonic() + 120
    while srv.server.store.version < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert srv.server.store.version >= 3, p.communicate(timeout=5)[0] if p.poll() is not None else "no progress"
    p.send_signal(sig)
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0, out
    state = srv.server.workers[0]
    assert state.left, f"the worker did not leave; output:\n{out}"


def _readme_diff() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### An existing PyTorch script: four lines", 1)[1]
    return section.split("```diff\n", 1)[1].split("```", 1)[0].splitlines()


def _code(line: str) -> str:
    return line.split("# ps")[0].rstrip()


def test_readme_diff_is_the_whole_change(tmp_path):
    """The README's diff adds at most five lines, its context and added lines are examples/cnn_api.py's in order,
    and undoing it gives a single-process script that trains where paramserver cannot be imported."""
    diff = [d for d in _readme_diff() if not d.startswith("@@")]
    assert 0 < sum(d.startswith("+") for d in diff) <= 5 and sum(d.startswith("-") for d in diff) <= 5
    with open(EXAMPLE) as f:
        raw = f.read().splitlines()
    code = [_code(line) for line in raw]
    single, i = [], 0
    for d in diff:
        tag, text = d[:1], d[1:].rstrip()
        if tag == "-":
            single.append(text)
            continue
        j = code.index(text, i)              # ValueError: the README's line is not in the example (in this order)
        single += raw[i:j] + ([raw[j]] if tag == " " else [])
        i = j + 1
    single += raw[i:]
    assert all(_code(line) in code for line in raw if line.endswith("# ps"))   # every marked line is in the diff
    assert sum(line.endswith("# ps") for line in raw) == sum(d.startswith("+") for d in diff)
    script = "\n".join(single) + "\n"
    assert "paramserver as ps" not in script and "ps." not in script.split('"""', 2)[2]
    (tmp_path / "single.py").write_text(script)
    blocker = tmp_path / "blocker" / "paramserver"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('paramserver is blocked in this process')\n")
    r = subprocess.run([sys.executable, str(tmp_path / "single.py"), "--epochs", "1"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path / "blocker"), OMP_NUM_THREADS="1"), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", r.stdout)
    assert m and float(m.group(2)) < 0.7 * float(m.group(1)), r.stdout
    assert "(64 steps)" in r.stdout            # one process, the whole data set: 2048 / 32 batches
