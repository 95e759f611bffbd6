"""paramserver/__init__.py: what its docstring says about torch is what importing does."""
from __future__ import annotations

import os
import subprocess
import sys

import paramserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_docstring_says_which_imports_load_torch():
    code = ("import sys\n"
            "import paramserver\n"
            "from paramserver import PSClient, ShardSampler, connect, worker_config\n"
            "print('worker-names', 'torch' in sys.modules)\n"
            "import paramserver.server\n"
            "print('server', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["worker-names", "False", "server", "True"], r.stdout + r.stderr[-2000:]
    doc = " ".join(paramserver.__doc__.split())
    assert "`import paramserver` itself imports no torch" in doc
    assert "The server does import torch" in doc     # it used to say the server imported none
