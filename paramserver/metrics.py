"""What the server records while it runs: rows per applied gradient and per granted pull (thinned evenly in
long runs, with exact totals beside them), timings.

These are the raw series behind `paramserver status`, the metrics file and the consistency
benchmark; nothing in them is estimated afterwards.

Usage::

    rec = ServerMetrics(); rec.record_grant(worker=0, clock=3, min_clock=1, waited=0.02)
    rec.summary()["updates_per_s"]
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable

import numpy as np

#: one row of ServerMetrics.updates per applied gradient (per update_stride-th in a long run): when, the version it produced, whose, how stale,
#: the worker's loss, ||theta_server - theta_worker|| when it arrived, and gradients applied so far
UPDATE_FIELDS = ["time_s", "version", "worker", "staleness", "loss", "divergence", "applied"]
GAP_FIELDS = ["time_s", "worker", "clock", "min_clock"]


def merge_counters(*counters) -> dict:
    """One map of counters kept apart by their owners (the policy's gradient counters, the server's event
    counters): what `status()["counters"]`, checkpoints and Prometheus show. A key counted by two owners is summed."""
    merged: dict = {}
    for part in counters:
        for key, value in part.items():
            merged[key] = merged[key] + value if key in merged else value
    return merged


class CounterView(Mapping):
    """A live, read-only view of counters kept apart by their owners, as one (a key counted by several is
    summed; a key never counted reads 0, as in a Counter). Each source is a callable returning its counter
    now, so an owner may replace its counter (a resume does) and the view still shows it.

        view = CounterView(lambda: policy.counters, lambda: events)
        view["dead"], dict(view)
    """

    def __init__(self, *sources: Callable[[], Mapping]):
        self._sources = sources

    def __getitem__(self, key):
        return sum(src().get(key, 0) for src in self._sources)

    def __contains__(self, key) -> bool:
        return any(key in src() for src in self._sources)

    def copy(self) -> dict:
        """The counts now, as one dict. Each source is copied first (`dict(Counter)` is one step under the GIL),
        so another thread (a test, a status tool in-process) never iterates a counter the server is adding a
        key to."""
        return merge_counters(*(dict(src()) for src in self._sources))

    def __iter__(self):
        return iter(self.copy())

    def __len__(self) -> int:
        return len(self.copy())

    def __repr__(self) -> str:
        return f"CounterView({self.copy()!r})"


#: the parts of the server thread's work timed apart (status `time_s`, Prometheus `paramserver_server_seconds`);
#: what is left of its busy time (decoding, bookkeeping, housekeeping) is "other"
PHASES = {
    "shm_in": "gradients copied out of same-host shared memory, with their NaN/Inf/bounds check",
    "check": "gradients checked (names, shapes, dtypes, NaN/Inf/bounds) and, in sync, 16-bit ones widened",
    "update": "the consistency policy: a sync step's sum and every optimizer apply (with the copy-on-write of a "
              "theta still being sent, or the wait for its send)",
    "divergence": "divergence samples at pulls and distances at pushes",
    "snapshot": "theta readied for a pull (its 16-bit copy once per version)",
    "shm_out": "theta written into the shared-memory slot a pull reads",
    "send": "replies handed to ZeroMQ (theta itself goes zero-copy)",
    "checkpoint": "periodic checkpoints written by the server loop",
}


class PhaseTimes:
    """Where the server thread's time goes: seconds busy (handling messages and housekeeping) and, within them,
    seconds per phase (PHASES). Timers nest safely: an inner phase or busy span inside an outer one is counted
    once, in the outer one, so the phases never add up to more than the busy time."""

    def __init__(self):
        self.busy_s = 0.0
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._busy_depth = 0
        self._phase: str | None = None

    @contextmanager
    def busy(self):
        self._busy_depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._busy_depth -= 1
            if not self._busy_depth:
                self.busy_s += time.perf_counter() - t0

    @contextmanager
    def phase(self, name: str):
        if self._phase is not None or not self._busy_depth:   # nested, or outside the busy time: not apart
            yield
            return
        self._phase = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._phase = None
            self.seconds[name] += time.perf_counter() - t0

    def summary(self) -> dict:
        """{"busy": s, phase: s ..., "other": s} (seconds since the start, rounded to 0.1 ms)."""
        other = max(0.0, self.busy_s - sum(self.seconds.values()))
        return {"busy": round(self.busy_s, 4), **{k: round(v, 4) for k, v in self.seconds.items()},
                "other": round(other, 4)}


def time_split(time_s: dict, per: int | None = None) -> str:
    """One line of where the server thread's time went, from status `time_s`: busy seconds (per `per` events,
    in ms, when given) and each phase's share of them, largest first (phases under 0.5% left out)."""
    busy = time_s.get("busy") or 0.0
    if busy <= 0:
        return "idle"
    parts = sorted(((k, v) for k, v in time_s.items() if k != "busy" and v / busy >= 0.005), key=lambda kv: -kv[1])
    shares = ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in parts)
    head = f"busy {busy:.2f} s" if not per else f"busy {1e3 * busy / per:.2f} ms per push"
    return f"{head}: {shares}"


class ServerMetrics:
    """The rows are kept for the whole run within a bound: once a series holds MAX_ROWS rows, every second row is
    dropped and from then on only every second one is kept (`update_stride` / `gap_stride` say every how many-th
    event a row stands for: 1 until a series first fills; the first event always has a row). So a server that runs
    for days keeps an evenly thinned record of all of it in bounded memory (about 25 MB per series) instead of
    growing by a row per push. Totals that a thinned series cannot give (how many events, the first grant, the
    largest staleness and clock gap) are kept exactly beside it."""

    #: rows kept per series (updates, pull gaps) before thinning
    MAX_ROWS = 100_000

    def __init__(self):
        self.started_at = time.time()
        self.updates: list[list] = []           # UPDATE_FIELDS, every update_stride-th applied gradient
        self.gaps: list[list] = []              # GAP_FIELDS, every gap_stride-th granted pull
        self.update_stride = self.gap_stride = 1
        self.updates_total = self.gaps_total = 0   # every event, rows or not
        self.first_grant_s: float | None = None
        self.staleness_max = self.gap_max = 0
        self.waits: dict[int, float] = {}       # worker -> seconds its pulls were held
        self.recent = deque(maxlen=200)         # (monotonic time, version, loss) for rates
        self.handle_s = deque(maxlen=100_000)   # seconds spent handling each recent message
        self.staleness_feed = deque(maxlen=100_000)   # every applied gradient's staleness, for the Prometheus histogram

    def elapsed(self) -> float:
        return round(time.time() - self.started_at, 4)

    def record_update(self, version: int, contributions, applied_before: int) -> None:
        t, applied = self.elapsed(), applied_before
        for c in contributions:
            loss = c.meta.get("loss")
            applied += 1
            self.staleness_feed.append(c.staleness)
            if loss is not None:
                self.recent.append((time.monotonic(), version, loss))
            self.staleness_max = max(self.staleness_max, c.staleness)
            self.updates_total += 1
            if (self.updates_total - 1) % self.update_stride == 0:   # events 1, 1 + stride, 1 + 2 stride, ...
                self.updates.append([t, version, c.worker, c.staleness, loss, c.meta.get("divergence"), applied])
                if len(self.updates) > self.MAX_ROWS:
                    self.updates, self.update_stride = self.updates[::2], self.update_stride * 2

    def record_grant(self, worker: int, clock: int, min_clock: int, waited: float) -> None:
        self.waits[worker] = self.waits.get(worker, 0.0) + waited
        t = self.elapsed()
        if self.first_grant_s is None:
            self.first_grant_s = t
        self.gap_max = max(self.gap_max, clock - min_clock)
        self.gaps_total += 1
        if (self.gaps_total - 1) % self.gap_stride == 0:
            self.gaps.append([t, worker, clock, min_clock])
            if len(self.gaps) > self.MAX_ROWS:
                self.gaps, self.gap_stride = self.gaps[::2], self.gap_stride * 2

    def summary(self) -> dict:
        """Rates for `status`: updates/s and mean loss over the recent window, handling-time percentiles."""
        recent = list(self.recent)
        rate = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
        losses = [r[2] for r in recent[-20:]]
        return {"updates_per_s": round(rate, 2), "loss": sum(losses) / len(losses) if losses else None,
                "uptime_s": round(time.time() - self.started_at, 2),
                "handle_ms": {f"p{q}": round(float(np.percentile(self.handle_s, q)) * 1e3, 4)
                              for q in (50, 90, 99)} if self.handle_s else {}}

    def series(self) -> dict:
        return {"t0_epoch": self.started_at, "updates": self.updates, "update_fields": UPDATE_FIELDS,
                "update_stride": self.update_stride, "updates_total": self.updates_total,
                "staleness_max": self.staleness_max, "pull_gaps": self.gaps, "pull_gap_fields": GAP_FIELDS,
                "pull_gap_stride": self.gap_stride, "pull_gaps_total": self.gaps_total,
                "first_grant_s": self.first_grant_s, "pull_gap_max": self.gap_max,
                "pull_wait_s": {str(w): round(s, 4) for w, s in self.waits.items()}}
