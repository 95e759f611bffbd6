"""paramserver/prom.py: /metrics of a live server, read back with prometheus_client's own parser."""
from __future__ import annotations

import argparse
import socket
import threading
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import ConfigError, ServerConfig, WorkerConfig, from_args
from paramserver.prom import metrics_host
from paramserver.server import Server
from tests.conftest import run_worker_thread, wait_for
from worker.client import PSClient, ServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(sample name, frozenset of labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_of_a_training_run(start_server, tmp_path):
    port = free_port()
    srv = start_server(num_workers=2, mode="ssp", staleness=2, optimizer="sgd", lr=0.05, metrics_port=port,
                       checkpoint=str(tmp_path / "ckpt.pt"))
    before = scrape(port)
    assert value(before, "paramserver_theta_version") == 0
    assert value(before, "paramserver_workers", state="live") == 0
    assert value(before, "paramserver_workers_expected") == 2
    assert value(before, "paramserver_info", version=_pkg(before), mode="ssp") == 1
    assert not any(k[0] == "paramserver_checkpoint_age_seconds" for k in before)

    results: dict = {}
    threads = [run_worker_thread(WorkerConfig(server=srv.address, rank=r, num_workers=2, job="mlp", batch_size=8,
                                              steps=25, eval_every=0, log_every=0, threads=1), results)
               for r in range(2)]
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(results[r], dict) for r in range(2)), results
    # one wrong gradient: counted as dropped with its reason
    with PSClient(srv.address, worker=2, server_timeout=10) as ps:   # (an automatic id would reuse a left one)
        ps.register()
        with pytest.raises(ServerError):
            ps.push({"nope": np.zeros(3, np.float32)}, version=0, clock=0)
    srv.server.write_checkpoint()   # from the test thread: the loop is idle by now

    status = srv.server.status()
    wait_for(lambda: value(scrape(port), "paramserver_gradients_received_total") == status["counters"]["received"],
             what="the published snapshot to catch up")
    m = scrape(port)
    applied = status["counters"]["applied"]
    assert applied == 50
    assert value(m, "paramserver_theta_version") == status["version"] == 50
    assert value(m, "paramserver_gradients_applied_total") == applied
    assert value(m, "paramserver_updates_total") == status["counters"]["updates"]
    assert value(m, "paramserver_gradients_dropped_total", reason="invalid") == 1
    assert value(m, "paramserver_events_total", event="rejected") == 1
    assert value(m, "paramserver_workers", state="left") == 2
    assert value(m, "paramserver_workers", state="live") == 1      # the test's own client
    assert value(m, "paramserver_workers", state="dead") == 0
    # the staleness histogram holds every applied gradient, with the staleness the server recorded
    stale = [row[3] for row in srv.server.record.updates]
    assert value(m, "paramserver_gradient_staleness_count") == applied
    assert value(m, "paramserver_gradient_staleness_sum") == sum(stale)
    assert value(m, "paramserver_gradient_staleness_bucket", le="0.0") == stale.count(0)
    assert value(m, "paramserver_gradient_staleness_bucket", le="+Inf") == applied
    # every handled message was timed (the count only grows; 2 x 25 pushes and pulls at least)
    assert value(m, "paramserver_message_handling_seconds_count") >= 100
    assert value(m, "paramserver_checkpoint_version") == 50
    for kind in ("pushed", "pulled", "received", "sent"):   # the bytes over the socket, as in status
        assert value(m, "paramserver_bytes_total", kind=kind) == status["bytes"][kind] > 0
    assert 0 <= value(m, "paramserver_checkpoint_age_seconds") < 600
    assert value(m, "paramserver_train_loss") > 0
    assert value(m, "paramserver_step") == status["step"] and value(m, "paramserver_waiting_pulls") == 0
    assert value(m, "paramserver_min_clock") == status["min_clock"] == srv.server.policy.min_clock()
    assert 0 < value(before, "paramserver_uptime_seconds") < value(m, "paramserver_uptime_seconds") < 600
    # where the server thread's time went: busy, and within it each phase (sgd applies 50 times)
    busy = value(m, "paramserver_server_seconds_total", phase="busy")
    parts = {p: value(m, "paramserver_server_seconds_total", phase=p)
             for p in ("shm_in", "check", "update", "divergence", "snapshot", "shm_out", "send", "checkpoint", "other")}
    assert busy > 0 and parts["update"] > 0 and parts["send"] > 0
    assert sum(parts.values()) == pytest.approx(busy, abs=1e-3)


def _pkg(samples: dict) -> str:
    (labels,) = [dict(k[1]) for k in samples if k[0] == "paramserver_info"]
    return labels["version"]


def test_metrics_port_in_use_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = Server(ServerConfig(bind="tcp://127.0.0.1:*", metrics_port=port, log_level="warning"))
        with pytest.raises(ConfigError, match="--metrics-port"):
            server.bind()
        server.close()


def test_metrics_listen_where_the_server_binds():
    assert metrics_host("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert metrics_host("tcp://0.0.0.0:5555") == "0.0.0.0"
    assert metrics_host("tcp://*:5555") == "0.0.0.0"
    assert metrics_host("ipc:///tmp/ps.sock") == "127.0.0.1"
    with pytest.raises(ConfigError, match="--metrics-port"):
        from_args(ServerConfig, argparse.Namespace(metrics_port=70000))


def test_scrape_while_training_never_breaks_the_loop(start_server):
    """Scrapes from another thread while the loop applies updates: every scrape parses and is consistent,
    versions only grow."""
    port = free_port()
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.05, metrics_port=port)
    results: dict = {}
    threads = [run_worker_thread(WorkerConfig(server=srv.address, rank=r, num_workers=2, job="mlp", batch_size=8,
                                              steps=60, eval_every=0, log_every=0, threads=1), results)
               for r in range(2)]
    seen = []
    stop = threading.Event()

    pairs = []

    def scraper():
        while not stop.is_set():
            m = scrape(port)
            seen.append(value(m, "paramserver_theta_version"))
            pairs.append((value(m, "paramserver_gradients_applied_total"),
                          value(m, "paramserver_gradient_staleness_count")))

    s = threading.Thread(target=scraper, daemon=True)
    s.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    s.join(timeout=30)
    assert all(isinstance(results[r], dict) for r in range(2)), results
    assert len(seen) >= 2 and seen == sorted(seen)
    # one scrape is one consistent snapshot: as many staleness observations as applied gradients
    assert all(applied == observed for applied, observed in pairs), pairs
    wait_for(lambda: value(scrape(port), "paramserver_theta_version") == srv.server.store.version == 120,
             what="the final version on /metrics")
