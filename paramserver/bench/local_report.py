"""`paramserver bench local`'s tables, comparisons and plots, from the runs' recorded figures (no run here).

Every figure is a median over the repeats with its [min, max]; a comparison between two runs is called
"separated" only where their ranges do not overlap.
"""
from __future__ import annotations

import json
import os

import numpy as np

BASE = "sync H=1"
FIELDS = ("final_eval_loss", "bytes_per_sample", "push_bytes_per_sample", "comm_share", "wall_s", "time_to_target")


def target_loss(runs: list[dict]) -> float:
    """A held-out loss that every run reached: the largest of the runs' best evaluations."""
    return max(min([e[1] for e in r["evals"]] + [r["final_eval_loss"]]) for r in runs)


def grouped(report: dict) -> dict[str, dict]:
    """{run name: {field: (median, min, max)}} over the repeats, in the order the runs ran."""
    from paramserver.bench.local import time_to
    runs = report["runs"]
    target = target_loss(runs)
    report["target_loss"] = target
    out: dict[str, dict] = {}
    for r in runs:
        r["time_to_target"] = time_to(r["evals"], target)
        if r["time_to_target"] is None and r["final_eval_loss"] <= target:
            r["time_to_target"] = r["wall_s"]   # reached only by the final θ
    for name in dict.fromkeys(r["name"] for r in runs):
        rows = [r for r in runs if r["name"] == name]
        out[name] = {"n": len(rows)}
        for key in FIELDS:
            vals = [r[key] for r in rows if r[key] is not None]
            out[name][key] = (float(np.median(vals)), min(vals), max(vals)) if vals else None
    return out


def _cell(v, spec: str, scale: float = 1.0) -> str:
    if v is None:
        return "n/a"
    med, lo, hi = (x * scale for x in v)
    return f"{med:{spec}} [{lo:{spec}}, {hi:{spec}}]" if hi > lo else f"{med:{spec}}"


def table(groups: dict) -> str:
    base = groups.get(BASE)
    lines = ["| run | held-out loss | vs sync H=1 | bytes/sample | push bytes/sample | comm share % | wall s | "
             "time to target s |", "|---|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        rel = f"{100 * (g['final_eval_loss'][0] / base['final_eval_loss'][0] - 1):+.1f}%" if base else "n/a"
        lines.append(f"| {name} | {_cell(g['final_eval_loss'], '.4f')} | {rel} | {_cell(g['bytes_per_sample'], '.0f')} "
                     f"| {_cell(g['push_bytes_per_sample'], '.0f')} | {_cell(g['comm_share'], '.1f', 100)} | "
                     f"{_cell(g['wall_s'], '.1f')} | {_cell(g['time_to_target'], '.1f')} |")
    return "\n".join(lines)


def separated(a, b) -> bool:
    """Do two (median, min, max) ranges not overlap?"""
    return a is not None and b is not None and (a[2] < b[1] or b[2] < a[1])


def _sep(ga: dict, gb: dict, key: str) -> str:
    if min(ga["n"], gb["n"]) < 2:
        return "one seed: no ranges"
    return "separated" if separated(ga[key], gb[key]) else "ranges overlap"


def pair_speedup(runs: list[dict], a: str, b: str) -> list[float]:
    """Per seed: time to target of run a / that of run b, the target being the loss both reached (the larger of
    their best evaluations), so a weak run elsewhere in the plan does not make the target easy."""
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        ra = next((r for r in runs if r["name"] == a and r["seed"] == seed), None)
        rb = next((r for r in runs if r["name"] == b and r["seed"] == seed), None)
        if ra is None or rb is None:
            continue
        target = target_loss([ra, rb])
        from paramserver.bench.local import time_to
        ta, tb = (time_to(r["evals"], target) or r["wall_s"] for r in (ra, rb))
        out.append(ta / tb if tb else float("nan"))
    return out


def comparisons(groups: dict, link: float, h_max: int, runs: list[dict] | None = None) -> list[str]:
    """The issue's targets as measured lines (each names both runs and says whether the ranges separate)."""
    lines = []
    g = groups.get

    def ratio(a, b, key, what):
        if g(a) and g(b) and g(a)[key] and g(b)[key]:
            r = g(b)[key][0] / g(a)[key][0] if g(a)[key][0] else float("nan")
            sep = _sep(g(a), g(b), key)
            lines.append(f"{what}: {b} / {a} = {r:.3f} ({sep})")
    def loss_delta(a, b, what):
        if g(a) and g(b):
            d = 100 * (g(b)["final_eval_loss"][0] / g(a)["final_eval_loss"][0] - 1)
            sep = _sep(g(a), g(b), "final_eval_loss")
            lines.append(f"{what}: {b} vs {a}: {d:+.2f}% held-out loss ({sep})")
    for name in groups:
        if name.startswith("avg H=") and name.split("=")[1].isdigit():
            ratio(BASE, name, "bytes_per_sample", "bytes per trained sample")
            loss_delta(BASE, name, "loss")
    for name in groups:
        if name.startswith("nesterov"):
            loss_delta(BASE, name, "loss")
    a, b = f"sync H=1 @{link:g}Mb/s", f"avg H={h_max} @{link:g}Mb/s"
    speed = pair_speedup(runs or [], a, b)
    if speed:
        lines.append(f"over an emulated {link:g} Mb/s link, {b} reaches the loss both reach "
                     f"{np.median(speed):.2f}x sooner than {a} (per seed: {', '.join(f'{x:.2f}' for x in speed)})")
    for name in (f"sync H=1 @{link:g}Mb/s", f"avg H={h_max} @{link:g}Mb/s"):
        if g(name):
            lines.append(f"share of worker time communicating, {name}: {100 * g(name)['comm_share'][0]:.1f}%")
    loss_delta(f"avg H={h_max} straggler", f"async avg H={h_max} straggler", "async local steps")
    ratio(f"avg H={h_max} straggler", f"async avg H={h_max} straggler", "wall_s", "wall time, straggler")
    loss_delta(f"avg H={h_max} straggler", f"async dN H={h_max} straggler", "delayed Nesterov")
    ratio("sync H=1 bf16", "sync H=1 int8+EF", "push_bytes_per_sample", "push bytes, int8+EF vs bf16")
    loss_delta(BASE, "sync H=1 int8+EF", "int8+EF")
    if g(BASE):
        lo, hi = g(BASE)["final_eval_loss"][1:]
        lines.append(f"sync H=1's own spread over the seeds: [{lo:.4f}, {hi:.4f}] ({100 * (hi / lo - 1):.2f}%)")
    return lines


def print_tables(report: dict) -> None:
    groups = grouped(report)
    cfg = report["config"]
    print(f"\nheld-out loss of the final θ at {cfg['samples']} trained samples; target loss (reached by every run) "
          f"{report['target_loss']:.4f}\n")
    print(table(groups))
    print()
    for line in comparisons(groups, cfg["link"], max(int(h) for h in cfg["h_values"].split(",")), report["runs"]):
        print("  " + line)


def write_report(report: dict, out: str) -> None:
    groups = grouped(report)
    cfg = report["config"]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = comparisons(groups, cfg["link"], max(int(h) for h in cfg["h_values"].split(",")), report["runs"])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# bench local\n\n{cfg['workers']} workers, {cfg['samples']} samples per run, job {cfg['job']}, "
                f"{report['cores']} cores, seeds {sorted({r['seed'] for r in report['runs']})}\n\n")
        f.write(table(groups) + "\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    write_plots(report, out)


def write_plots(report: dict, out: str) -> list[str]:
    """Held-out loss against bytes communicated per worker and against wall time (rank 0's evaluations)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seed = min(r["seed"] for r in report["runs"])
    files = []
    for fname, xlabel, xs in (("loss_vs_bytes.png", "MB communicated per worker (push + pull)", _mb_axis),
                              ("loss_vs_time.png", "wall time (s, rank 0's clock)", _time_axis)):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in report["runs"]:
            if r["seed"] != seed or not r["evals"]:
                continue
            ax.plot(xs(r, report["config"]), [e[1] for e in r["evals"]], marker=".", label=r["name"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss")
        ax.set_title(f"bench local, seed {seed}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)
        files.append(fname)
    return files


def _time_axis(r: dict, cfg: dict) -> list[float]:
    return [e[0] for e in r["evals"]]


def _mb_axis(r: dict, cfg: dict) -> list[float]:
    """MB per worker so far at each evaluation: the run's bytes per trained sample times the samples a worker
    had trained by then (rank 0's steps x batch size)."""
    return [r["bytes_per_sample"] * e[2] * cfg["batch_size"] / 1e6 for e in r["evals"]]
