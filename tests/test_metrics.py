"""paramserver/metrics.py: the server's records stay bounded however long it runs, thinned evenly."""
from __future__ import annotations

from paramserver.consistency import Contribution
from paramserver.metrics import PHASES, PhaseTimes, ServerMetrics, time_split


def test_rows_are_thinned_evenly_once_a_series_is_full(monkeypatch):
    monkeypatch.setattr(ServerMetrics, "MAX_ROWS", 8)
    rec = ServerMetrics()
    for v in range(1, 101):
        rec.record_update(v, [Contribution(worker=v % 3, clock=v, base_version=v - 1 - v % 4, staleness=v % 4)],
                          applied_before=v - 1)
        rec.record_grant(worker=v % 3, clock=v, min_clock=v - 1, waited=0.001)
    assert len(rec.updates) <= 8 and len(rec.gaps) <= 8             # bounded (was: one row per push and pull)
    assert rec.update_stride == rec.gap_stride == 16                  # 100 events in rows of every 16th
    assert [u[6] for u in rec.updates] == list(range(1, 101, 16))     # evenly: the 1st, 17th, 33rd ... gradient
    assert [u[1] for u in rec.updates] == list(range(1, 101, 16))
    assert [g[2] for g in rec.gaps] == list(range(1, 101, 16))
    assert len(rec.staleness_feed) == 100                             # the histogram still sees every gradient
    series = rec.series()
    assert series["update_stride"] == series["pull_gap_stride"] == 16
    # what thinned rows cannot tell is kept exactly
    assert series["updates_total"] == series["pull_gaps_total"] == 100
    assert series["staleness_max"] == 3 and series["pull_gap_max"] == 1
    assert series["first_grant_s"] == rec.gaps[0][0]
    assert round(sum(rec.waits.values()), 6) == 0.1


def test_a_short_run_keeps_every_row():
    rec = ServerMetrics()
    for v in range(1, 51):
        rec.record_update(v, [Contribution(worker=0, clock=v, base_version=v - 1)], applied_before=v - 1)
    assert len(rec.updates) == 50 and rec.update_stride == 1 and [u[6] for u in rec.updates] == list(range(1, 51))


def test_phase_times_count_nested_spans_once_and_the_rest_as_other(monkeypatch):
    from paramserver import metrics
    clock = iter(range(100))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: float(next(clock)))
    t = PhaseTimes()
    with t.phase("check"):            # outside the busy time: not counted
        pass
    with t.busy():                    # 0 .. 6 (the clock reads 1 at the nested busy span's start)
        with t.busy():                # nested busy: counted once, in the outer span
            with t.phase("update"):   # 2 .. 3, and the nested phase inside it belongs to update
                with t.phase("send"):
                    pass
        with t.phase("send"):         # 4 .. 5
            pass
    s = t.summary()
    assert s["busy"] == 6.0 and s["update"] == 1.0 and s["send"] == 1.0 and s["check"] == 0.0
    assert s["other"] == 4.0 and set(s) == {"busy", "other", *PHASES}
    assert time_split(s) == "busy 6.00 s: other 67%, update 17%, send 17%"
    assert time_split(s, per=3) == "busy 2000.00 ms per push: other 67%, update 17%, send 17%"
    assert time_split(PhaseTimes().summary()) == "idle"
