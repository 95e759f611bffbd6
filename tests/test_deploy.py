"""What the container deployment (deploy/) relies on: ranks assigned by the server, a server that
resumes from its own checkpoint when restarted, and the PS_* environment of a container."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

from common.config import ConfigError, JobConfig, ServerConfig, WorkerConfig, from_args
from paramserver.server import Server
from tests.conftest import ROOT, run_worker_thread
from worker.models import build_job
from worker.train import run_worker


def _auto_workers(address: str, n: int, steps: int = 10) -> list[WorkerConfig]:
    return [WorkerConfig(server=address, rank=-1, num_workers=n, job="mlp", batch_size=8, steps=steps,
                         eval_every=0, log_every=0, threads=1) for _ in range(n)]


def test_auto_ranks_cover_every_shard_once(start_server):
    """Three workers with --rank -1: the server's ids become their ranks, so the shards are disjoint and
    together the whole data set, and the sync job runs as with ranks given by hand."""
    srv = start_server(num_workers=3, mode="sync", optimizer="sgd", lr=0.05)
    results: list = []
    threads = [threading.Thread(target=lambda c=cfg: results.append(run_worker(c)), daemon=True)
               for cfg in _auto_workers(srv.address, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    assert sorted(m["rank"] for m in results) == [0, 1, 2]
    assert all(m["rank"] == m["worker_id"] and len(m["steps"]) == 10 for m in results)
    assert set(srv.server.workers) == {0, 1, 2} and all(s.left for s in srv.server.workers.values())
    assert srv.server.policy.counters["applied"] == 30
    n_train = build_job(JobConfig(job="mlp"), "cpu").n_samples
    assert sum(m["shard_size"] for m in results) == n_train    # three disjoint shards: every sample once


def test_auto_rank_worker_process_reports_its_rank(start_server):
    """`paramserver worker` with PS_RANK=auto (no --rank): registers as -1 and trains as the rank it was given."""
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.05)
    env = dict(os.environ, PYTHONPATH=ROOT, PS_RANK="auto", PS_NUM_WORKERS="2", PS_SERVER=srv.address)
    args = [sys.executable, "-m", "paramserver", "worker", "--job", "mlp", "--batch-size", "8", "--steps", "5",
            "--eval-every", "0", "--threads", "1"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = sorted(line.split()[1] for out in outs for line in out.splitlines() if line.startswith("worker "))
    assert done == ["0", "1"], outs
    assert all("rank assigned by the server" in out for out in outs), outs


def test_ps_rank_auto_and_rank_bounds():
    os.environ["PS_RANK"] = "auto"
    try:
        assert from_args(WorkerConfig, argparse.Namespace(num_workers=3)).rank == -1
    finally:
        del os.environ["PS_RANK"]
    with pytest.raises(ConfigError, match="--rank -2"):
        from_args(WorkerConfig, argparse.Namespace(rank=-2, num_workers=3))
    with pytest.raises(ConfigError, match="--rank 3"):
        from_args(WorkerConfig, argparse.Namespace(rank=3, num_workers=3))


def test_auto_resume_starts_fresh_then_resumes(start_server, tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    first = start_server(num_workers=2, mode="sync", optimizer="adam", checkpoint=ckpt, auto_resume=True)
    assert first.server.store.version == 0 and not os.path.exists(ckpt)   # nothing to resume: fresh
    results: dict = {}
    for cfg in _auto_workers(first.address, 2, steps=7):
        run_worker_thread(cfg, results).join(timeout=0)
    deadline = time.monotonic() + 120
    while first.server.policy.counters["applied"] < 14 and time.monotonic() < deadline:
        time.sleep(0.1)
    first.stop()                                   # SIGTERM's path: the final checkpoint is written
    crc, version = first.server.store.checksum(), first.server.store.version
    assert version == 7 and os.path.exists(ckpt)
    again = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2, optimizer="adam", checkpoint=ckpt,
                                auto_resume=True, log_level="warning"))
    assert again.store.version == version and again.store.checksum() == crc
    assert again.policy.counters["applied"] == 14


def test_auto_resume_needs_checkpoint():
    with pytest.raises(ConfigError, match="--auto-resume"):
        from_args(ServerConfig, argparse.Namespace(auto_resume=True))
    with pytest.raises(ConfigError, match="--auto-resume"):
        from_args(ServerConfig, argparse.Namespace(auto_resume=True, checkpoint="a.pt", resume="b.pt"))


# -- the deploy files' commands are valid command lines of today's CLI ----------------------------------

DEPLOY = os.path.join(ROOT, "deploy")


def _parse(argv: list[str], env: dict[str, str]):
    """The config `paramserver ARGV` builds under env (PS_* variables), via the real parser."""
    from paramserver.cli import build_parser
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("PS_")})
    try:
        args = build_parser().parse_args(argv)
        return from_args(ServerConfig if args.command == "server" else WorkerConfig, args)
    finally:
        for k in [k for k in os.environ if k.startswith("PS_")]:
            del os.environ[k]
        os.environ.update(saved)


def _compose_defaults(value) -> str:
    """Compose's interpolation with every variable unset: ${VAR:-default} -> default, ${VAR} -> "" (podman-compose
    1.0.3 takes no empty default, ${VAR:-}: the templates write ${VAR} for an empty one)."""
    value = re.sub(r"\$\{(\w+):-([^}]+)\}", lambda m: m.group(2), str(value))
    assert "${" not in re.sub(r"\$\{\w+\}", "", value), f"an interpolation podman-compose 1.0.3 leaves as it is: {value}"
    return re.sub(r"\$\{\w+\}", "", value)


def _compose(name: str) -> dict:
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.curve.yml"])
def test_compose_commands_are_valid(name):
    services = _compose(name)["services"]
    env = {svc: {k: _compose_defaults(v) for k, v in desc.get("environment", {}).items()}
           for svc, desc in services.items()}
    server = _parse([_compose_defaults(a) for a in services["server"]["command"]], env["server"])
    worker = _parse([_compose_defaults(a) for a in services["worker"]["command"]], env["worker"])
    assert server.bind == "tcp://0.0.0.0:5555" and server.auto_resume and server.checkpoint.startswith("/data/")
    assert server.metrics_port == 9100 and server.num_workers == worker.num_workers == 3
    assert worker.rank == -1 and worker.server == "tcp://server:5555"
    assert int(_compose_defaults(services["worker"]["deploy"]["replicas"])) == worker.num_workers
    if "curve" in name:
        assert server.curve_secret and server.auth and worker.curve_server and worker.curve_secret


def test_curve_compose_is_the_plain_one_plus_curve():
    """docker-compose.curve.yml is a full copy (podman-compose appends override lists): no drift allowed."""
    plain, curve = _compose("docker-compose.yml"), _compose("docker-compose.curve.yml")
    for desc in curve["services"].values():
        desc["command"] = [a for a in desc["command"] if not a.startswith(("--curve-", "--auth"))]
        desc.pop("secrets")
        desc.get("healthcheck", {}).update(test=desc.get("healthcheck", {}).get("test", [])[:6])
        if "volumes" in desc:
            desc["volumes"] = [v for v in desc["volumes"] if "keys" not in v]
    for doc in (plain, curve):
        doc.pop("secrets", None)
        doc.pop("name")
    assert curve == plain


def _k8s_command(kind: str, tmp_path, extra_env: dict[str, str]):
    """Run a manifest's container command in sh with a stand-in `paramserver` that records argv and env."""
    docs = []
    for name in ("configmap.yaml", "ps.yaml", "workers.yaml"):
        with open(os.path.join(DEPLOY, "k8s", name)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (obj,) = [d for d in docs if d["kind"] == kind]
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "paramserver"
    fake.write_text("#!/bin/sh\nenv | grep '^PS_' > \"$OUT.env\"\nprintf '%s\\n' \"$@\" > \"$OUT.argv\"\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out"), **cm["data"],
           **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}, **extra_env}
    subprocess.run(c["command"] + c["args"], env=env, check=True)
    argv = (tmp_path / "out.argv").read_text().splitlines()
    ps_env = dict(line.split("=", 1) for line in (tmp_path / "out.env").read_text().splitlines())
    return _parse(argv, ps_env), ps_env, obj


def test_k8s_server_command_is_valid(tmp_path):
    cfg, env, sts = _k8s_command("StatefulSet", tmp_path, {"HOSTNAME": "ps-2", "SHARDS": "3"})
    assert env["PS_SHARD_INDEX"] == "2" and env["PS_NUM_SHARDS"] == "3"    # the shard index is the ordinal
    assert (cfg.shard_index, cfg.num_shards) == (2, 3)
    assert cfg.bind == "tcp://0.0.0.0:5555" and cfg.auto_resume and cfg.metrics_port == 9100
    assert cfg.num_workers == 3 and cfg.mode == "sync"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.metrics_port)


@pytest.mark.parametrize("index, rank", [("1", 1), (None, -1)])
def test_k8s_worker_command_is_valid(tmp_path, index, rank):
    cfg, env, job = _k8s_command("Job", tmp_path, {"JOB_COMPLETION_INDEX": index} if index else {})
    assert cfg.rank == rank          # the Indexed Job's completion index, else assigned by the server
    assert cfg.server == "tcp://ps-0.ps:5555" and cfg.num_workers == job["spec"]["completions"] == 3


def test_auto_rank_register_is_not_resent_while_the_server_is_slow():
    """A REGISTER with id -1 that is sent again is a second registration (another id, a phantom worker that
    is later declared dead): a worker with --rank -1 waits for the first answer instead of resending."""
    import zmq
    from common.protocol import Message, MsgType, decode, encode
    from worker.client import PSClient
    from worker.connect import register

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    received = []

    def slow_server():   # answers the first REGISTER after 1.5 s, counting every REGISTER it gets meanwhile
        deadline = time.monotonic() + 1.5
        first = None
        while time.monotonic() < deadline:
            if router.poll(50):
                frames = router.recv_multipart()
                msg = decode(frames[1:])
                received.append(msg.seq)
                first = first or (frames[0], msg)
        router.send_multipart([first[0]] + encode(Message(MsgType.WELCOME, worker=0, seq=first[1].seq)))

    class Job:
        def params_numpy(self):
            return {}

    t = threading.Thread(target=slow_server, daemon=True)
    t.start()
    cfg = WorkerConfig(server=f"tcp://127.0.0.1:{port}", rank=-1, num_workers=2, job="mlp", request_timeout=0.2)
    with PSClient(cfg.server, worker=-1, request_timeout=0.2, server_timeout=10) as ps:
        welcome, _ = register(ps, cfg, init=Job().params_numpy())
        assert ps.request_timeout == 0.2          # restored for the requests that follow
    t.join(timeout=10)
    router.close()
    assert welcome.worker == 0
    assert len(received) == 1, f"REGISTER sent {len(received)} times"
