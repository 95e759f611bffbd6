"""Benchmark outputs: results.json, summary.csv, PNG plots and report.md (and the terminal table)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

TITLES = {"none": "no straggler", "straggler": "one persistent straggler", "jitter": "transient delays (jitter)"}
PHRASES = {"none": "Without a straggler", "straggler": "With a persistent straggler",
           "jitter": "With transient delays"}
COLUMNS = [("run", 14), ("scenario", 9), ("wall_s", 8), ("upd/s", 7), ("samples/s", 9), ("stale_mean", 10),
           ("stale_max", 9), ("diverg_mean", 11), ("wait%", 6), ("comm%", 6), ("dropped", 7), ("eval_loss", 9),
           ("t_target_s", 10)]
#: the second table: every run after the same number of computed gradients (dropped ones included)
EQUAL_COLUMNS = [("run", 14), ("scenario", 9), ("computed", 8), ("dropped", 7), ("t_equal_s", 9),
                 ("loss_at_equal", 13)]


def _fmt(r: dict, key: str, spec: str, scale: float = 1.0, none: str = "n/a") -> str:
    """The median, with its range [min-max] when there are several repeats and they differ."""
    v = r["summary"].get(key)
    text = none if v is None else format(v * scale, spec)
    lo, hi = (r.get("range") or {}).get(key, [None, None])
    if r.get("repeats", 1) > 1 and lo is not None and (hi is None or hi != lo):
        text += f" [{format(lo * scale, spec)}-{none if hi is None else format(hi * scale, spec)}]"
    return text


def _row(r: dict) -> list:
    wait = "(in comm)" if r["summary"]["share_wait"] is None else _fmt(r, "share_wait", ".1f", 100)
    return [r["name"], r["scenario"], _fmt(r, "wall_s", ".2f"), _fmt(r, "updates_per_s", ".1f"),
            _fmt(r, "samples_per_s", ".0f"), _fmt(r, "staleness_mean", ".2f"), _fmt(r, "staleness_max", ".0f"),
            _fmt(r, "divergence_mean", ".4f"), wait, _fmt(r, "share_comm", ".1f", 100),
            _fmt(r, "gradients_dropped", ".0f"), _fmt(r, "final_eval_loss", ".4f"),
            _fmt(r, "time_to_target_s", ".2f", none="not reached")]


def _equal_row(r: dict) -> list:
    return [r["name"], r["scenario"], _fmt(r, "gradients_computed", ".0f"), _fmt(r, "gradients_dropped", ".0f"),
            _fmt(r, "time_at_equal_computed_s", ".2f"), _fmt(r, "loss_at_equal_computed", ".4f")]


def ranked(report: dict) -> list[dict]:
    """Runs ranked by (median) time to the target loss (runs that never reach it last, by final loss)."""
    return sorted(report["runs"], key=lambda r: (r["summary"].get("time_to_target_s") is None,
                                                 r["summary"].get("time_to_target_s") or 0.0,
                                                 r["summary"]["final_eval_loss"]))


def ranked_equal(report: dict) -> list[dict]:
    """Runs ranked by held-out loss after the same number of computed gradients."""
    return sorted(report["runs"], key=lambda r: (r["summary"].get("loss_at_equal_computed") is None,
                                                 r["summary"].get("loss_at_equal_computed") or 0.0))


def separated(a: dict, b: dict, key: str) -> bool | None:
    """True when a's range of `key` lies wholly below b's (None = not reached counts as +inf); None when
    there is a single repeat (no noise estimate)."""
    if min(a.get("repeats", 1), b.get("repeats", 1)) < 2:
        return None
    a_hi = (a.get("range") or {}).get(key, [None, None])[1]
    b_lo = (b.get("range") or {}).get(key, [None, None])[0]
    if a_hi is None:
        return False
    return b_lo is None or a_hi < b_lo


def verdict(a: dict, b: dict, key: str) -> str:
    """How a compares with b on `key` (lower is better), honest about run-to-run noise."""
    if separated(a, b, key):
        return "lower in every repeat (ranges do not overlap)"
    if separated(b, a, key):
        return "higher in every repeat (ranges do not overlap)"
    if min(a.get("repeats", 1), b.get("repeats", 1)) < 2:
        return "one repeat: run-to-run noise not measured, no ranking"
    return "within run-to-run noise (ranges overlap)"


def print_table(report: dict) -> None:
    rep = report.get("repeats", 1)
    print(f"\ntarget held-out loss {report['target_eval_loss']} ({report['target_rule']})")
    print(f"budget: {report['config']['steps'] * report['config']['workers']} applied gradients per run"
          + (f"; figures are medians [range] over {rep} repeats" if rep > 1 else ""))
    print("  ".join(name.ljust(w) for name, w in COLUMNS))
    for r in ranked(report):
        print("  ".join(v.ljust(w) for v, (_, w) in zip(_row(r), COLUMNS)))
    print(f"\nat equal computed gradients ({report.get('equal_computed')} computed, dropped ones included):")
    print("  ".join(name.ljust(w) for name, w in EQUAL_COLUMNS))
    for r in ranked_equal(report):
        print("  ".join(v.ljust(w) for v, (_, w) in zip(_equal_row(r), EQUAL_COLUMNS)))
    print(f"\nwritten: {report.get('out', '')}results.json, summary.csv, report.md, plots", flush=True)


def _smooth(y: list, k: int) -> np.ndarray:
    y = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    if len(y) < k or k <= 1:
        return y
    kernel = np.ones(k) / k
    return np.convolve(y, kernel, mode="valid")


def write_plots(report: dict, out: str) -> list[str]:
    """The four figures of the report, written into `out`; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    scenarios = sorted({r["scenario"] for r in runs}, key=list(TITLES).index)
    files = _plot_losses(plt, report, scenarios, out)
    files.append(_plot_staleness(plt, runs, scenarios, out))
    files.append(_plot_throughput_wait(plt, runs, scenarios, out))
    return files


def _plot_losses(plt, report: dict, scenarios: list[str], out: str) -> list[str]:
    """Held-out loss against wall-clock time and against gradients applied, one panel per scenario."""
    runs = report["runs"]
    files = []
    for xkey, fname, xlabel in (("time_s", "loss_vs_time.png", "wall-clock seconds"),
                                ("applied", "loss_vs_updates.png", "gradients applied")):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            for r in (r for r in runs if r["scenario"] == sc):
                ev = np.array(r["series"]["evals"])
                x = ev[:, 0] if xkey == "time_s" else ev[:, 1]
                ax.plot(x, ev[:, 2], marker=".", label=r["name"])
            ax.axhline(report["target_eval_loss"], color="grey", ls="--", lw=0.8, label="target")
            ax.set_title(f"held-out loss, {TITLES[sc]}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (nats/byte)" if report["config"]["job"] == "gpt"
                          and not report["config"].get("entry") else "held-out loss")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)
        files.append(fname)
    return files


def _plot_staleness(plt, runs: list[dict], scenarios: list[str], out: str) -> str:
    """The staleness histogram of every run that has any, one panel per scenario."""
    # only the runs with some staleness: sync, backup workers and DDP are all 0 and would squash the rest
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        sel = [r for r in runs if r["scenario"] == sc and r["summary"]["staleness_max"]]
        width = 0.8 / max(1, len(sel))
        for i, r in enumerate(sel):
            h = np.asarray(r["series"]["staleness_hist"], dtype=float)
            if h.sum():
                ax.bar(np.arange(len(h)) + i * width, h / h.sum(), width=width, label=r["name"])
        zero = sorted({r["name"] for r in runs if r["scenario"] == sc and not r["summary"]["staleness_max"]})
        ax.set_title(f"staleness, {TITLES[sc]}" + (f"\n(always 0, not drawn: {', '.join(zero)})" if zero else ""),
                     fontsize=9)
        ax.set_xlabel("server version at apply - version computed on")
        ax.set_ylabel("fraction of gradients")
        if sel:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "staleness_hist.png"), dpi=100)
    plt.close(fig)
    return "staleness_hist.png"


def _plot_throughput_wait(plt, runs: list[dict], scenarios: list[str], out: str) -> str:
    """Samples/s and the shares of the workers' time, grouped by scenario, one colour per run kind."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    by = {(r["name"], r["scenario"]): r for r in runs}
    width = 0.8 / max(1, len(names))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    ax = axes[0]
    for k, name in enumerate(names):
        xs = [g + k * width for g, sc in enumerate(scenarios) if (name, sc) in by]
        ys = [by[(name, sc)]["summary"]["samples_per_s"] for sc in scenarios if (name, sc) in by]
        ax.bar(xs, ys, width=width, color=colors[name], label=name)
    ax.set_xticks(np.arange(len(scenarios)) + width * (len(names) - 1) / 2, [TITLES[sc] for sc in scenarios],
                  fontsize=8)
    ax.set_ylabel("samples/s (applied gradients x batch / wall)")
    ax.set_title("throughput")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax = axes[1]
    parts = (("share_compute", "compute", None), ("share_wait", "wait imposed by the policy", "//"),
             ("share_comm", "communication", ".."), ("share_straggler_sleep", "straggler slowdown", "xx"))
    for k, name in enumerate(names):
        for g, sc in enumerate(scenarios):
            r = by.get((name, sc))
            if r is None:
                continue
            bottom = 0.0
            for key, _, hatch in parts:
                v = r["summary"][key] or 0.0       # DDP: its waiting is inside communication
                ax.bar(g + k * width, v, width=width, bottom=bottom, color=colors[name], hatch=hatch,
                       edgecolor="white", linewidth=0.3)
                bottom += v
    ax.set_xticks(np.arange(len(scenarios)) + width * (len(names) - 1) / 2, [TITLES[sc] for sc in scenarios],
                  fontsize=8)
    ax.set_ylabel("share of worker time")
    ax.set_title("where the workers' time went (bars in the same order and colours as on the left)", fontsize=9)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(facecolor="grey", hatch=h, edgecolor="white", label=lbl) for _, lbl, h in parts]
              + [Patch(facecolor="none", edgecolor="none", label="DDP: waiting is inside communication")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput_wait.png"), dpi=100)
    plt.close(fig)
    return "throughput_wait.png"


def write_report(report: dict, out: str) -> None:
    report["out"] = out.rstrip("/") + "/"
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([name for name, _ in COLUMNS] + [name for name, _ in EQUAL_COLUMNS[2:]])
        for r in ranked(report):
            w.writerow(_row(r) + _equal_row(r)[2:])
    plots = write_plots(report, out)
    cfg, m = report["config"], report["machine"]
    rep = report.get("repeats", 1)
    budget = cfg["steps"] * cfg["workers"]
    lines = [
        "# Consistency benchmark: sync vs backup workers vs bounded staleness vs async vs DDP", "",
        f"Job: `{cfg['job']}` (n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, context {cfg['context']}), "
        f"{cfg['workers']} workers, batch {cfg['batch_size']}, optimizer {cfg['optimizer']} lr {cfg['lr']}, "
        f"seed {cfg['seed']}" + (f" to {cfg['seed'] + rep - 1} ({rep} repeats)" if rep > 1 else "") + ". Every run "
        f"starts from the same θ and stops after the same budget of {budget} applied gradients. Straggler "
        f"scenario: the last worker sleeps ({cfg['straggler']} - 1) x its compute time after each step.", "",
        f"Machine: {m['platform']}, {m['cpus']} CPU cores, Python {m['python']}, torch {m['torch']}. All "
        f"{cfg['workers']} workers, the server and the benchmark share these cores, so absolute speeds are "
        "those of an oversubscribed machine; the comparison between runs is what this measures.", "",
        (f"Every figure is the **median over {rep} repeats** (seeds differ: initial θ, batch order, straggler "
         "draws), with its range [min-max]. A ranking is stated only where the ranges do not overlap."
         if rep > 1 else "**One repeat**: run-to-run noise is not measured, so no difference below is a ranking; "
         "rerun with `--repeats 3` to rank."), "",
        f"Target held-out loss: **{report['target_eval_loss']}** ({report['target_rule']}). "
        f"Benchmark wall time {report['bench_wall_s']} s.", "",
        f"## At equal applied gradients (the budget: {budget} applied), fastest to the target first", "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in ranked(report)]
    lines += ["", "Columns: wall time from the start gate to the last applied gradient; updates/s = optimizer "
              "steps on the server per second; samples/s = applied gradients x batch / wall; staleness = server "
              "version at apply - version the gradient was computed on; divergence = L2 distance between the θ a "
              "worker computed on and the server's θ when its gradient arrived (DDP: replicas are identical by "
              "construction); wait = share of the workers' time held by the policy (the barrier or the staleness "
              "bound; not the start gate); comm = share in transfer (DDP: its allreduce time includes waiting for "
              "the slowest rank, so its wait is shown as (in comm)); eval_loss = held-out loss of the final θ; "
              "t_target_s = first rank-0 evaluation at or below the target.", "",
              f"## At equal computed gradients ({report.get('equal_computed')} computed, dropped ones included), "
              "lowest held-out loss first", "",
              "Backup workers compute gradients they then drop, so at equal *applied* gradients they have processed "
              "more samples than the others. Here every run is compared after the same number of gradients "
              "computed by its workers (samples processed = computed x batch): t_equal_s is when it got there, "
              "loss_at_equal its held-out loss then (interpolated between rank-0 evaluations).", "",
              "| " + " | ".join(name for name, _ in EQUAL_COLUMNS) + " |", "|" + "---|" * len(EQUAL_COLUMNS)]
    lines += ["| " + " | ".join(_equal_row(r)) + " |" for r in ranked_equal(report)]
    lines += ["", "Plots (curves: the first repeat):", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Where each worker's time went (% of its compute + wait + comm + straggler sleep, first repeat)",
              "", "| run | scenario | " + " | ".join(f"worker {w['rank']}" for w in
                                                  report["runs"][0]["series"]["per_worker"])
              + " |", "|---|---|" + "---|" * len(report["runs"][0]["series"]["per_worker"])]
    for r in report["runs"]:
        cells = []
        for w in r["series"]["per_worker"]:
            total = (w["compute_s"] + w["wait_s"] + w["comm_s"] + w["sleep_s"]) or 1.0
            cells.append(f"{100 * w['compute_s'] / total:.0f} / {100 * w['wait_s'] / total:.0f} / "
                         f"{100 * w['comm_s'] / total:.0f} / {100 * w['sleep_s'] / total:.0f} ({w['steps']} steps)")
        lines.append(f"| {r['name']} | {r['scenario']} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: compute / wait / comm / straggler sleep, in % of that worker's time, and its pushes "
              "(DDP: wait is inside comm)."]
    lines += ["", "## What the numbers say", ""] + findings(report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _wait_text(s: dict) -> str:
    return ("in allreduce (waiting included)", s["share_comm"]) if s["share_wait"] is None else \
        ("waiting", s["share_wait"])


def findings(report: dict) -> list[str]:
    """Plain statements derived from this run's numbers (nothing here is fixed text about results). A
    comparison says whether the ranges over the repeats overlap; with one repeat it ranks nothing."""
    by = {(r["name"], r["scenario"]): r for r in report["runs"]}
    out = []
    for sc in TITLES:
        sync = by.get(("sync", sc))
        if not sync:
            continue
        ss = sync["summary"]
        for (name, scen), r in by.items():
            if scen != sc or name == "sync":
                continue
            s = r["summary"]
            speed = s["wall_s"] and ss["wall_s"] / s["wall_s"]
            what, share = _wait_text(s)
            ttt, sync_ttt = s.get("time_to_target_s"), ss.get("time_to_target_s")
            reach = "did not reach the target" if ttt is None else f"reached the target at {ttt:.1f}s"
            equal = ""
            if s.get("loss_at_equal_computed") is not None and ss.get("loss_at_equal_computed") is not None:
                equal = (f"; after {report.get('equal_computed')} computed gradients its held-out loss was "
                         f"{s['loss_at_equal_computed']:.4f} vs {ss['loss_at_equal_computed']:.4f} "
                         f"({verdict(r, sync, 'loss_at_equal_computed')})")
            out.append(f"- {PHRASES[sc]}, **{name}** finished the budget in {s['wall_s']:.1f}s vs sync's "
                       f"{ss['wall_s']:.1f}s ({speed:.2f}x; {verdict(r, sync, 'wall_s')}) and {reach} (sync: "
                       f"{'did not' if sync_ttt is None else f'{sync_ttt:.1f}s'}; "
                       f"{verdict(r, sync, 'time_to_target_s')}); final held-out loss {s['final_eval_loss']:.4f} vs "
                       f"{ss['final_eval_loss']:.4f} ({verdict(r, sync, 'final_eval_loss')}){equal}; workers "
                       f"{what} {100 * share:.1f}% of their time vs sync's {100 * (ss['share_wait'] or 0):.1f}% "
                       "waiting.")
    slow, fast = by.get(("sync", "straggler")), by.get(("sync", "none"))
    if slow and fast:
        out.append(f"- The straggler stretched sync from {fast['summary']['wall_s']:.1f}s to "
                   f"{slow['summary']['wall_s']:.1f}s ({verdict(fast, slow, 'wall_s')}); its workers spent "
                   f"{100 * slow['summary']['share_wait']:.1f}% of their time waiting at the barrier.")
    for (name, scen), r in by.items():
        s = r["summary"]
        if name.startswith("ssp") and scen == "straggler" and slow and s["wall_s"] > 0.8 * slow["summary"]["wall_s"]:
            out.append(f"- **{name}** did not escape a *persistent* straggler ({s['wall_s']:.1f}s vs sync's "
                       f"{slow['summary']['wall_s']:.1f}s): once the fast workers are s clocks ahead, the bound "
                       "makes them wait for the slow one at every clock, so they run at its pace.")
    return out
