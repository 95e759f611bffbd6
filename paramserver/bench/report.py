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


def _row(r: dict) -> list:
    s = r["summary"]
    div = s["divergence_mean"]
    ttt = s.get("time_to_target_s")
    return [r["name"], r["scenario"], f"{s['wall_s']:.2f}", f"{s['updates_per_s']:.1f}", f"{s['samples_per_s']:.0f}",
            f"{s['staleness_mean']:.2f}", str(s["staleness_max"]), "n/a" if div is None else f"{div:.4f}",
            f"{100 * s['share_wait']:.1f}", f"{100 * s['share_comm']:.1f}", str(s["gradients_dropped"]),
            f"{s['final_eval_loss']:.4f}", "not reached" if ttt is None else f"{ttt:.2f}"]


def ranked(report: dict) -> list[dict]:
    """Runs ranked by time to the target loss (runs that never reach it last, by final loss)."""
    return sorted(report["runs"], key=lambda r: (r["summary"].get("time_to_target_s") is None,
                                                 r["summary"].get("time_to_target_s") or 0.0,
                                                 r["summary"]["final_eval_loss"]))


def print_table(report: dict) -> None:
    print(f"\ntarget held-out loss {report['target_eval_loss']} ({report['target_rule']})")
    print("  ".join(name.ljust(w) for name, w in COLUMNS))
    for r in ranked(report):
        print("  ".join(v.ljust(w) for v, (_, w) in zip(_row(r), COLUMNS)))
    print(f"\nwritten: {report.get('out', '')}results.json, summary.csv, report.md, plots", flush=True)


def _smooth(y: list, k: int) -> np.ndarray:
    y = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    if len(y) < k or k <= 1:
        return y
    kernel = np.ones(k) / k
    return np.convolve(y, kernel, mode="valid")


def write_plots(report: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    scenarios = sorted({r["scenario"] for r in runs}, key=list(TITLES).index)
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

    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        sel = [r for r in runs if r["scenario"] == sc]
        width = 0.8 / max(1, len(sel))
        for i, r in enumerate(sel):
            h = np.asarray(r["series"]["staleness_hist"], dtype=float)
            if h.sum():
                ax.bar(np.arange(len(h)) + i * width, h / h.sum(), width=width, label=r["name"])
        ax.set_title(f"staleness of applied gradients, {TITLES[sc]}")
        ax.set_xlabel("server version at apply - version computed on")
        ax.set_ylabel("fraction of gradients")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "staleness_hist.png"), dpi=100)
    plt.close(fig)
    files.append("staleness_hist.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['name']}\n{r['scenario']}" for r in runs]
    x = np.arange(len(runs))
    axes[0].bar(x, [r["summary"]["samples_per_s"] for r in runs], color="tab:blue")
    axes[0].set_xticks(x, labels, rotation=60, fontsize=7)
    axes[0].set_ylabel("samples/s (applied gradients x batch / wall)")
    axes[0].set_title("throughput")
    bottom = np.zeros(len(runs))
    for key, color, label in (("share_compute", "tab:green", "compute"), ("share_wait", "tab:red", "wait (barrier/bound)"),
                              ("share_comm", "tab:orange", "communication"),
                              ("share_straggler_sleep", "tab:grey", "straggler slowdown")):
        vals = np.array([r["summary"][key] for r in runs])
        axes[1].bar(x, vals, bottom=bottom, color=color, label=label)
        bottom += vals
    axes[1].set_xticks(x, labels, rotation=60, fontsize=7)
    axes[1].set_ylabel("share of worker time")
    axes[1].set_title("where the workers' time went")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput_wait.png"), dpi=100)
    plt.close(fig)
    files.append("throughput_wait.png")
    return files


def write_report(report: dict, out: str) -> None:
    report["out"] = out.rstrip("/") + "/"
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([name for name, _ in COLUMNS])
        for r in ranked(report):
            w.writerow(_row(r))
    plots = write_plots(report, out)
    cfg, m = report["config"], report["machine"]
    lines = [
        "# Consistency benchmark: sync vs backup workers vs bounded staleness vs async vs DDP", "",
        f"Job: `{cfg['job']}` (n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, context {cfg['context']}), "
        f"{cfg['workers']} workers, batch {cfg['batch_size']}, optimizer {cfg['optimizer']} lr {cfg['lr']}, "
        f"seed {cfg['seed']}. Every run starts from the same θ and stops after the same budget of "
        f"{cfg['steps'] * cfg['workers']} applied gradients. Straggler scenario: the last worker sleeps "
        f"({cfg['straggler']} - 1) x its compute time after each step.", "",
        f"Machine: {m['platform']}, {m['cpus']} CPU cores, Python {m['python']}, torch {m['torch']}. All "
        f"{cfg['workers']} workers, the server and the benchmark share these cores, so absolute speeds are "
        "those of an oversubscribed machine; the comparison between runs is what this measures.", "",
        f"Target held-out loss: **{report['target_eval_loss']}** ({report['target_rule']}). "
        f"Benchmark wall time {report['bench_wall_s']} s.", "",
        "## Ranking (fastest to the target first)", "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in ranked(report)]
    lines += ["", "Columns: wall time from the start gate to the last applied gradient; updates/s = optimizer "
              "steps on the server per second; samples/s = applied gradients x batch / wall; staleness = server "
              "version at apply - version the gradient was computed on; divergence = L2 distance between the θ a "
              "worker computed on and the server's θ when its gradient arrived (DDP: replicas are identical by "
              "construction); wait/comm = share of the workers' time held at the barrier or staleness bound / "
              "in transfer (DDP: allreduce time, which includes waiting for the slowest rank, is reported as comm); "
              "eval_loss = held-out loss of the final θ; t_target_s = first rank-0 evaluation at or below the target.",
              ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Where each worker's time went (% of its compute + wait + comm + straggler sleep)", "",
              "| run | scenario | " + " | ".join(f"worker {w['rank']}" for w in report["runs"][0]["series"]["per_worker"])
              + " |", "|---|---|" + "---|" * len(report["runs"][0]["series"]["per_worker"])]
    for r in report["runs"]:
        cells = []
        for w in r["series"]["per_worker"]:
            total = (w["compute_s"] + w["wait_s"] + w["comm_s"] + w["sleep_s"]) or 1.0
            cells.append(f"{100 * w['compute_s'] / total:.0f} / {100 * w['wait_s'] / total:.0f} / "
                         f"{100 * w['comm_s'] / total:.0f} / {100 * w['sleep_s'] / total:.0f} ({w['steps']} steps)")
        lines.append(f"| {r['name']} | {r['scenario']} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: compute / wait / comm / straggler sleep, in % of that worker's time, and its pushes."]
    lines += ["", "## What the numbers say", ""] + findings(report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def findings(report: dict) -> list[str]:
    """Plain statements derived from this run's numbers (nothing here is fixed text about results)."""
    by = {(r["name"], r["scenario"]): r["summary"] for r in report["runs"]}
    out = []
    for sc in TITLES:
        sync = by.get(("sync", sc))
        if not sync:
            continue
        for (name, scen), s in by.items():
            if scen != sc or name == "sync":
                continue
            speed = s["wall_s"] and sync["wall_s"] / s["wall_s"]
            waiting = (f"in allreduce (which includes waiting) {100 * s['share_comm']:.1f}%" if name == "ddp"
                       else f"waiting {100 * s['share_wait']:.1f}%")
            ttt, sync_ttt = s.get("time_to_target_s"), sync.get("time_to_target_s")
            reach = "never reached the target" if ttt is None else f"reached the target at {ttt:.1f}s"
            out.append(f"- {PHRASES[sc]}, **{name}** finished the budget "
                       f"in {s['wall_s']:.1f}s vs sync's {sync['wall_s']:.1f}s ({speed:.2f}x) and {reach} "
                       f"(sync: {'never' if sync_ttt is None else f'{sync_ttt:.1f}s'}); final held-out loss "
                       f"{s['final_eval_loss']:.4f} vs {sync['final_eval_loss']:.4f}; workers {waiting} of their "
                       f"time vs sync's {100 * sync['share_wait']:.1f}% waiting.")
    curves = {(r["name"], r["scenario"]): np.array(r["series"]["evals"]) for r in report["runs"]}
    for sc in TITLES:
        ref = curves.get(("sync", sc))
        if ref is None:
            continue
        for (name, scen), ev in curves.items():
            if scen != sc or name == "sync" or ev[-1, 0] >= ref[-1, 0]:
                continue
            at = float(np.interp(ev[-1, 0], ref[:, 0], ref[:, 2]))   # sync's held-out loss at the same moment
            out.append(f"- {PHRASES[sc]}, when **{name}** had spent the "
                       f"budget ({ev[-1, 0]:.1f}s) its held-out loss was {ev[-1, 2]:.4f}; sync's at that moment was "
                       f"{at:.4f} ({'ahead of' if ev[-1, 2] < at else 'behind'} sync at equal wall-clock time).")
    slow, fast = by.get(("sync", "straggler")), by.get(("sync", "none"))
    if slow and fast:
        out.append(f"- The straggler stretched sync from {fast['wall_s']:.1f}s to {slow['wall_s']:.1f}s; its workers "
                   f"spent {100 * slow['share_wait']:.1f}% of their time waiting at the barrier.")
    jit = by.get(("sync", "jitter"))
    for (name, scen), s in by.items():
        if name.startswith("ssp") and scen == "jitter" and jit:
            out.append(f"- With transient delays, **{name}** took {s['wall_s']:.1f}s vs sync's {jit['wall_s']:.1f}s "
                       f"(workers waiting {100 * s['share_wait']:.1f}% vs {100 * jit['share_wait']:.1f}%).")
        if name.startswith("ssp") and scen == "straggler" and slow and s["wall_s"] > 0.8 * slow["wall_s"]:
            out.append(f"- **{name}** did not escape a *persistent* straggler ({s['wall_s']:.1f}s vs sync's "
                       f"{slow['wall_s']:.1f}s): once the fast workers are s clocks ahead, the bound makes them "
                       "wait for the slow one at every clock, so they run at its pace. Bounded staleness absorbs "
                       "transient delays, not a worker that is always slower.")
    return out
