"""common/security.py and `paramserver keys`: secret files 0600, no silent overwrite, admin keys."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture: `paramserver ARGS` in this process)
from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT)


def keys(*args):
    """`paramserver keys ARGS` through a real process (the end-to-end check of the command)."""
    return subprocess.run([sys.executable, "-m", "paramserver", "keys", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=60)


def test_secret_key_files_are_private_and_admins_are_admitted(tmp_path):
    d = tmp_path / "keys"
    r = keys(str(d), "--clients", "w0", "--admin", "ops")
    assert r.returncode == 0, r.stderr
    for name in ("server", "w0", "ops"):
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
    assert sorted(os.listdir(d / "clients")) == ["ops.key", "w0.key"]
    assert os.listdir(d / "admins") == ["ops.key"]
    assert (d / "admins" / "ops.key").read_text() == (d / "ops.key").read_text()


def test_existing_keys_are_not_overwritten_without_force(cli, tmp_path):
    d = tmp_path / "keys"
    assert cli("keys", str(d)).returncode == 0
    before = (d / "server.key_secret").read_text()
    r = cli("keys", str(d))
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (d / "server.key_secret").read_text() == before
    assert cli("keys", str(d), "--no-server", "--clients", "extra").returncode == 0     # adding keys is fine
    assert (d / "server.key_secret").read_text() == before
    assert cli("keys", str(d), "--force").returncode == 0
    assert (d / "server.key_secret").read_text() != before


def test_a_refused_client_hears_that_the_server_may_be_refusing_its_key(tmp_path):
    import numpy as np
    import pytest

    from common.security import make_keys
    from tests.conftest import RunningServer
    from worker.client import PSClient, ServerUnavailable
    keys = make_keys(str(tmp_path / "keys"), ("server", "client"))
    rogue = make_keys(str(tmp_path / "rogue"), ("client",))
    srv = RunningServer(num_workers=1, mode="async", curve_secret=keys["server"][1],
                        auth=str(tmp_path / "keys" / "clients"))
    try:
        with PSClient(srv.address, worker=0, request_timeout=0.2, server_timeout=1.0, curve_server=keys["server"][0],
                      curve_secret=rogue["client"][1]) as bad:
            with pytest.raises(ServerUnavailable, match="the server may be refusing this key"):
                bad.register(init={"w": np.ones(3, np.float32)})
    finally:
        srv.stop()
