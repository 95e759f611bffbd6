"""The printed output of `paramserver bench scale`: one line per run, the result table and issue 10's target.

Pure functions of scale.json's report (paramserver/bench/scale.py): `_line` (the progress line of a run),
`table` (every run with its ratios against single and its time split), `target_lines` (the fastest sync
variant per global batch against TARGET_RATIO and TARGET_LOSS_PCT) and `print_scale`, which prints them with
the notes. Nothing here runs anything.
"""
from __future__ import annotations

import os


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _line(r: dict) -> str:
    what = f"{r['name']} at global batch {r['batch']}"
    if r.get("skipped"):
        return f"{what}: {r['failure']}"
    text = (f"{what} ({r.get('layout')}): {_fmt(r.get('samples_per_s'), '.1f')} samples/s, held-out loss "
            f"{_fmt(r.get('eval_loss'), '.4f')}")
    if r["kind"] == "ps":
        text += f", x{_fmt(r.get('ratio'), '.3f')} of single, loss {_fmt(r.get('loss_diff_pct'), '+.2f')}%"
    if r.get("failure"):
        text += f"  [{r['failure']}]"
    return text


COLUMNS = ("variant", "B", "layout", "samples/s", "x single", "held-out", "vs single", "step ms", "compute", "wait",
           "pull", "push", "apply")


def table(report: dict) -> str:
    """The result table (times are milliseconds per step; apply: per server update)."""
    rows = []
    for r in report["runs"]:
        note = ""
        if r.get("skipped"):
            note = "skipped (budget)"
        elif r.get("failure"):
            note = "timed out" if r["failure"] == "timeout" else "failed: " + r["failure"][:60]
        elif r["kind"] == "ps" and r.get("same_samples") is False:
            note = "other samples than single"
        rows.append([r["name"] if r["kind"] == "ps" else f"single ({r.get('device')})", str(r["batch"]),
                     r.get("layout", "-"), _fmt(r.get("samples_per_s"), ".1f"), _fmt(r.get("ratio"), ".3f"),
                     _fmt(r.get("eval_loss"), ".4f"), _fmt(r.get("loss_diff_pct"), "+.2f", "-") +
                     ("%" if r.get("loss_diff_pct") is not None else ""),
                     _fmt(r.get("step_ms"), ".1f"), _fmt(r.get("compute_ms"), ".1f"), _fmt(r.get("wait_ms"), ".1f"),
                     _fmt(r.get("pull_ms"), ".1f"), _fmt(r.get("push_ms"), ".1f"), _fmt(r.get("apply_ms"), ".1f"),
                     note])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(row[:-1]) + (f"  {row[-1]}" if row[-1] else "") for row in rows]
    return "\n".join(lines)


def print_scale(report: dict) -> None:
    m, c = report["machine"], report["config"]
    print()
    print(f"paramserver vs single-process training, same model ({report['model']['parameters']:,} parameters), "
          f"same optimizer ({c['optimizer']}, lr {c['lr']}), same samples ({c['steps']} steps), device {m['device']}"
          + (f" ({m['gpu']})" if m.get("gpu") else "") + f", {m['cpus']} CPU cores")
    print(table(report))
    print("samples/s after the warm-up; x single: against the single-process run at the same global batch B; "
          "held-out loss after the same samples and its difference from single; times in ms per worker step "
          "(compute: theta into the model, forward, backward, gradients out; wait: held at the barrier or "
          "staleness bound; pull/push: communication; apply: the optimizer per update, the server's or the "
          "single run's)")
    for line in target_lines(report):
        print(line)
    procs = max((r.get("variant", {}).get("workers", 0) + r.get("variant", {}).get("shards", 0)
                 for r in report["runs"]), default=0)
    if m["cpus"] and procs > m["cpus"]:
        print(f"note: up to {procs} processes (workers + server shards) on {m['cpus']} cores: oversubscribed, "
              "the figures measure contention as much as the parameter server")
    print(f"results: {os.path.join(c['out'], 'scale.json')}", flush=True)


#: issue 10's target for sync mode on a GPU: at least this fraction of single-process samples/s, and the
#: held-out loss within this many percent of the single run's
TARGET_RATIO, TARGET_LOSS_PCT = 0.5, 2.0


#: issue 20: 4 workers sharing one GPU with --local-steps 50 against single-process training, samples/s
TARGET_LOCAL_RATIO = 0.8


def target_lines(report: dict) -> list[str]:
    """Per global batch: the fastest complete sync variant against the target (TARGET_RATIO, TARGET_LOSS_PCT)."""
    lines = []
    for b in sorted({r["batch"] for r in report["runs"]}):
        done = [r for r in report["runs"] if r["batch"] == b and r["kind"] == "ps" and r.get("ratio") is not None]
        for r in (r for r in done if r["variant"].get("local", 1) > 1):   # issue 20: local steps
            lines.append(f"global batch {b}: local steps {r['name']!r} at {r['ratio']:.3f}x single (issue 20's GPU "
                         f"target at H = 50: >= {TARGET_LOCAL_RATIO}x: {'met' if r['ratio'] >= TARGET_LOCAL_RATIO else 'missed'})")
        syncs = [r for r in done if r["variant"]["mode"] == "sync" and r["variant"].get("local", 1) == 1
                 and r.get("loss_diff_pct") is not None]
        if not syncs:
            continue
        best = max(syncs, key=lambda r: r["ratio"])
        met = best["ratio"] >= TARGET_RATIO and abs(best["loss_diff_pct"]) <= TARGET_LOSS_PCT
        lines.append(f"global batch {b}: fastest sync variant {best['name']!r} at {best['ratio']:.3f}x single, loss "
                     f"{best['loss_diff_pct']:+.2f}% (issue 10's GPU target >= {TARGET_RATIO}x and within {TARGET_LOSS_PCT:g}%: "
                     f"{'met' if met else 'missed'})")
    return lines
