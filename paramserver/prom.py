"""Prometheus metrics of the server: `/metrics` on `--metrics-port`, served by prometheus_client.

The server's loop owns its state. It publishes a snapshot here (`publish`, at most every half
second, from the loop) and feeds each message's handling time as it is measured (`handled`); the
HTTP thread of prometheus_client reads only the last published snapshot and the histograms (which
lock themselves), so a scrape never reads state the loop is changing.

Usage::

    prom = PromExporter(server, port=9100)   # starts the HTTP thread
    prom.publish()                           # from the server loop
    prom.close()
"""
from __future__ import annotations

import logging
import os
import threading
import time
from importlib.metadata import PackageNotFoundError, version as package_version
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from common.config import ConfigError

log = logging.getLogger("paramserver.prom")

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
HANDLE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.0)
#: policy counters that count gradients; every other counter is an event (duplicates, malformed, dead, ...)
GRADIENT_COUNTERS = {"received": "gradients received (pushes that decoded)",
                     "applied": "gradients applied to theta",
                     "updates": "updates of theta (a sync step, or one ssp/async push)"}


def metrics_host(bind: str) -> str:
    """The interface /metrics listens on: the host of --bind (all interfaces for * or 0.0.0.0)."""
    parts = urlsplit(bind)
    if parts.scheme != "tcp":
        return "127.0.0.1"
    host = parts.netloc.rsplit(":", 1)[0].strip("[]")
    return "0.0.0.0" if host in ("*", "0.0.0.0", "") else host


def _package_version() -> str:
    try:
        return package_version("paramserver")
    except PackageNotFoundError:
        return "unknown"


class _Snapshot:
    """Reads the snapshot the server loop last published (called by the HTTP thread on a scrape).

    The staleness histogram is read under the same lock as the snapshot, so a scrape never sees more
    staleness observations than applied gradients."""

    def __init__(self, staleness: Histogram, handling: Histogram):
        self.state: dict | None = None
        self.lock = threading.Lock()
        self.staleness, self.handling = staleness, handling

    def collect(self):
        with self.lock:
            s = self.state
            families = list(self._families(s)) + list(self.staleness.collect()) if s else []
        return families + list(self.handling.collect())

    def _families(self, s: dict):
        yield InfoMetricFamily("paramserver", "paramserver build and job",
                               value={"version": s["package_version"], "mode": s["mode"]})
        yield GaugeMetricFamily("paramserver_theta_version", "version of theta (updates applied since the start)",
                                value=s["version"])
        yield GaugeMetricFamily("paramserver_step", "sync: steps applied", value=s["step"])
        g = GaugeMetricFamily("paramserver_workers", "workers by state", labels=["state"])
        for state in ("live", "dead", "left"):
            g.add_metric([state], s["workers"][state])
        yield g
        yield GaugeMetricFamily("paramserver_workers_expected", "--num-workers: workers the start gate waits for",
                                value=s["num_workers"])
        yield GaugeMetricFamily("paramserver_waiting_pulls", "pulls held back by the consistency policy",
                                value=s["waiting_pulls"])
        yield GaugeMetricFamily("paramserver_min_clock", "the slowest live worker's clock", value=s["min_clock"])
        if s["loss"] is not None:
            yield GaugeMetricFamily("paramserver_train_loss", "mean training loss of the last 20 applied gradients",
                                    value=s["loss"])
        counters = s["counters"]
        for key, doc in GRADIENT_COUNTERS.items():
            yield CounterMetricFamily(f"paramserver_gradients_{key}" if key != "updates" else "paramserver_updates",
                                      doc, value=counters.get(key, 0))
        c = CounterMetricFamily("paramserver_gradients_dropped", "gradients received but not applied, by reason",
                                labels=["reason"])
        for key, value in sorted(counters.items()):
            if key.startswith("dropped:"):
                c.add_metric([key.split(":", 1)[1]], value)
        yield c
        c = CounterMetricFamily("paramserver_events", "duplicates, malformed and rejected requests, dead workers, "
                                "disconnects, failed handshakes, internal errors", labels=["event"])
        for key, value in sorted(counters.items()):
            if key not in GRADIENT_COUNTERS and not key.startswith("dropped:"):
                c.add_metric([key], value)
        yield c
        if s["checkpoint_at"] is not None:
            yield GaugeMetricFamily("paramserver_checkpoint_age_seconds", "seconds since the checkpoint was written",
                                    value=max(0.0, time.time() - s["checkpoint_at"]))
        if s["checkpoint_version"] is not None:
            yield GaugeMetricFamily("paramserver_checkpoint_version", "theta version in the last checkpoint written",
                                    value=s["checkpoint_version"])
        c = CounterMetricFamily("paramserver_server_seconds", "seconds the server thread spent busy (phase=busy) and, "
                                "within that, in each phase of its work (the rest: phase=other)", labels=["phase"])
        for phase, seconds in s["time_s"].items():
            c.add_metric([phase], seconds)
        yield c
        c = CounterMetricFamily("paramserver_bytes", "bytes of messages over the socket (received, sent; pushed: PUSH "
                                "requests, pulled: replies with theta) and through shared memory (shm_pushed, "
                                "shm_pulled)", labels=["kind"])
        for kind, value in sorted(s.get("bytes", {}).items()):
            c.add_metric([kind], value)
        yield c
        yield GaugeMetricFamily("paramserver_uptime_seconds", "seconds since this server process started",
                                value=time.time() - s["started_at"])


class PromExporter:
    """Serves one server's metrics on http://HOST:port/metrics (HOST from --bind) in its own registry."""

    def __init__(self, server, port: int, host: str | None = None):
        self.server = server
        self.staleness = Histogram("paramserver_gradient_staleness", "staleness of each applied gradient "
                                   "(server version when applied - version it was computed on)",
                                   buckets=STALENESS_BUCKETS, registry=None)
        self.handling = Histogram("paramserver_message_handling_seconds", "time the server loop spent "
                                  "handling one message", buckets=HANDLE_BUCKETS, registry=None)
        self.snapshot = _Snapshot(self.staleness, self.handling)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.snapshot)
        self._next_publish = 0.0
        self._version = _package_version()
        host = host or metrics_host(server.cfg.bind)
        try:
            self.httpd, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                              f"choose a free port") from None
        self.port = self.httpd.server_port
        self.publish(force=True)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def handled(self, seconds: float) -> None:
        """One message's handling time (from the server loop)."""
        self.handling.observe(seconds)

    def publish(self, force: bool = False) -> None:
        """Take a snapshot of the server's state (from the server loop, which owns it)."""
        now = time.monotonic()
        if not force and now < self._next_publish:
            return
        self._next_publish = now + 0.5
        srv = self.server
        feed = srv.record.staleness_feed
        new_staleness = [feed.popleft() for _ in range(len(feed))]
        states = {"live": 0, "dead": 0, "left": 0}
        for w in srv.workers.values():
            states["left" if w.left else ("live" if w.alive else "dead")] += 1
        ck = srv.last_checkpoint
        if ck:
            checkpoint_at, checkpoint_version = srv.record.started_at + ck["written_s"], ck["version"]
        elif srv.cfg.checkpoint and os.path.exists(srv.cfg.checkpoint):   # e.g. the one this server resumed from
            checkpoint_at, checkpoint_version = os.path.getmtime(srv.cfg.checkpoint), None
        else:
            checkpoint_at = checkpoint_version = None
        recent = list(srv.record.recent)[-20:]
        state = {
            "package_version": self._version, "mode": srv.cfg.mode, "version": srv.store.version,
            "step": srv.policy.step, "workers": states, "num_workers": srv.cfg.num_workers,
            "waiting_pulls": len(srv.pending), "min_clock": srv.policy.min_clock(),
            "loss": sum(r[2] for r in recent) / len(recent) if recent else None,
            "counters": srv.counters.copy(), "checkpoint_at": checkpoint_at,
            "checkpoint_version": checkpoint_version, "started_at": srv.record.started_at,
            "time_s": srv.phases.summary(), "bytes": dict(srv.transport.bytes),
        }
        with self.snapshot.lock:
            for staleness in new_staleness:
                self.staleness.observe(staleness)
            self.snapshot.state = state

    def close(self) -> None:
        """Stop the HTTP thread. Safe to call twice."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
