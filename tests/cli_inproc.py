"""`paramserver ARGS` run in the test process: a one-line error is checked through the parser and the config
without starting a Python process (tests/test_cli.py keeps one real process per command for the end-to-end path).

Usage (import the fixture into a test module)::

    from tests.cli_inproc import cli   # noqa: F401  (a pytest fixture)
    def test_x(cli):
        r = cli("server", "--mode", "syncc")
        assert r.returncode == 2 and "invalid choice" in r.stderr
"""
from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `paramserver.cli.main(argv)` here; returns (returncode, stdout, stderr) like subprocess.run.

    What main() changes in a process is put back afterwards: the SIGINT/SIGTERM handlers (server, worker and
    cluster install theirs), the root logger (basicConfig), the environment (the OpenMP spin setting, env=),
    torch's thread count (--threads). glibc's malloc settings (keep_freed_memory) cannot be undone, so that
    call is left out here: it tunes memory and says nothing about a flag."""
    import common.tuning
    from paramserver.cli import main
    monkeypatch.setattr(common.tuning, "keep_freed_memory", lambda: False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    environ, threads = dict(os.environ), torch.get_num_threads()

    def run(*argv: str, env: dict | None = None) -> SimpleNamespace:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()                  # what came before is not this command's output
        root = logging.getLogger()
        root_handlers, root_level = list(root.handlers), root.level
        try:
            code = main(list(argv))
        except SystemExit as exc:            # argparse and parser.exit: the exit status of the command
            code = exc.code
        finally:                             # a handler basicConfig added would outlive this test
            for h in [h for h in root.handlers if h not in root_handlers]:
                root.removeHandler(h)
            root.setLevel(root_level)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=0 if code is None else code, stdout=out, stderr=err)

    try:
        yield run
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
