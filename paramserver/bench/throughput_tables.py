"""The tables of `paramserver bench throughput`: its results (throughput.json's dict) as text.

Pure functions of the figures a run measured (paramserver/bench/throughput_measure.py): `table` (round trip,
apply and capacity per size and wire dtype, with every ratio against the limits of the same run, and the
convergence table), `time_notes` (the round trip's ceiling and the server's time split per capacity lane),
`shm_table` (shared memory against tcp) and `shards_table` (K shards x N workers). Nothing here measures.
"""
from __future__ import annotations

def table(results: dict) -> str:
    """The results as a markdown table (ratios against the limits measured in the same run)."""
    workers = " / ".join(results["config"]["workers"].split(","))
    rows = ["| P | wire | MB per push | raw zmq RT ms | push+pull RT ms | raw / push+pull | apply ms sgd / momentum / "
            "adam (check) | torch add_ / fused Adam ms | adam / fused Adam | add_ / sgd | async pushes/s "
            f"({workers} workers) | server peak RSS / theta (above idle; private pages) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        ap = r["apply_ms"]
        tl = r["torch"]
        for wire, w in r["wire"].items():
            cap = w["capacity"]
            caps = " / ".join(str(cap[k]["pushes_per_s"]) for k in cap)
            last = cap[list(cap)[-1]] if cap else {}
            adam = f"{ap['adam'] / tl['adam_fused_ms']:.2f}x" if "adam" in ap else "-"
            sgd = f"{tl['add_ms'] / ap['sgd']:.2f}x" if "sgd" in ap else "-"
            rows.append(
                f"| {r['params'] / 1e6:g}M | {wire} | {w['bytes'] / 1e6:g} | {r['raw_zmq_ms']} | "
                f"{w['round_trip_ms']} | {r['raw_zmq_ms'] / w['round_trip_ms']:.2f}x | "
                f"{' / '.join(str(ap.get(o, '-')) for o in ('sgd', 'momentum', 'adam'))} ({ap.get('check', '-')}) | "
                f"{tl['add_ms']} / {tl['adam_fused_ms']} | {adam} | {sgd} | "
                f"{caps} | {last.get('peak_rss_over_theta', '-')}x ({last.get('peak_minus_idle_over_theta', '-')}x; "
                f"{last.get('peak_anon_over_theta', '-')}x) |")
    for r in results["sizes"]:
        fp32 = r["wire"].get("fp32")
        for wire, w in r["wire"].items():
            if wire != "fp32" and fp32:
                caps = ", ".join(f"{k} workers {w['capacity'][k]['pushes_per_s'] / c['pushes_per_s']:.2f}x"
                                 for k, c in fp32["capacity"].items() if k in w["capacity"] and c["pushes_per_s"])
                limit = (f" (raw ZeroMQ at half the bytes: {r['raw_zmq_ms'] / r['raw_zmq_half_ms']:.2f}x faster)"
                         if r.get("raw_zmq_half_ms") else "")
                rows.append(f"\n{r['params'] / 1e6:g}M, {wire} vs fp32: bytes {w['bytes'] / fp32['bytes']:.2f}x, "
                            f"round trip {fp32['round_trip_ms'] / w['round_trip_ms']:.2f}x faster{limit}, "
                            f"capacity {caps}")
    conv = results.get("convergence")
    if conv:
        rows.append("")
        rows.append("| wire | held-out loss after the run (mean of the seeds) | per seed | vs fp32 | wall s |")
        rows.append("|---|---|---|---|---|")
        base = conv.get("fp32", {}).get("final_eval_loss")
        for wire, c in conv.items():
            rel = f"{(c['final_eval_loss'] / base - 1) * 100:+.2f}%" if base and c.get("final_eval_loss") else "-"
            per = " / ".join(f"{x:.4f}" if x is not None else "-" for x in c.get("losses", [c.get("final_eval_loss")]))
            mean = f"{c['final_eval_loss']:.4f}" if c.get("final_eval_loss") is not None else "-"
            rows.append(f"| {wire} | {mean} | {per} | {rel} | {c['wall_s']} |")
        fp32 = [x for x in conv.get("fp32", {}).get("losses", []) if x is not None]
        if len(fp32) > 1:
            rows.append(f"\nfp32's spread between seeds: {(max(fp32) - min(fp32)) / min(fp32) * 100:.2f}% "
                        "(a wire's difference within it is noise)")
    return "\n".join(rows)


def time_notes(results: dict) -> str:
    """Where the time goes, from the same run: the round trip's ceiling (a server that checks and applies the
    whole gradient before it answers adds at least its apply to the raw round trip) and, for each capacity
    lane at its most workers, the server thread's busy time per applied push split by phase (status time_s)."""
    from paramserver.metrics import time_split
    rows = []
    for r in results["sizes"]:
        size = f"{r['params'] / 1e6:g}M"
        fp32, sgd = r["wire"].get("fp32"), r["apply_ms"].get("sgd")
        if fp32 and sgd:
            raw = r["raw_zmq_ms"]
            rows.append(f"- {size}, round trip: raw / (raw + the server's sgd apply) = {raw:g} / ({raw:g} + {sgd:g}) = "
                        f"{raw / (raw + sgd):.2f}x at best for an apply before the answer; measured "
                        f"{raw / fp32['round_trip_ms']:.2f}x (shared memory: {raw / r['shm']['round_trip_ms']:.2f}x)"
                        if "shm" in r else
                        f"- {size}, round trip: raw / (raw + the server's sgd apply) = {raw:g} / ({raw:g} + {sgd:g}) = "
                        f"{raw / (raw + sgd):.2f}x at best for an apply before the answer; measured "
                        f"{raw / fp32['round_trip_ms']:.2f}x")
        lanes = [(f"{wire} tcp", w.get("capacity", {})) for wire, w in r["wire"].items()]
        if "shm" in r:
            lanes.append(("fp32 shm", r["shm"].get("capacity", {})))
        for name, caps in lanes:
            if not caps:
                continue
            n = list(caps)[-1]
            c = caps[n]
            per = c.get("server_applied") or c.get("applied")
            if c.get("server_time_s") and per:
                rows.append(f"- {size}, {name}, {n} workers ({c['pushes_per_s']} pushes/s): server "
                            f"{time_split(c['server_time_s'], per=per)}")
    return ("where the time goes (same run):\n" + "\n".join(rows)) if rows else ""


def _share(share: dict | None) -> str:
    """'100% / 100%': the pulls / pushes that went through shared memory."""
    if not share:
        return "-"
    return (f"{share['shm_pulls'] / max(1, share['pulls']):.0%} / "
            f"{share['shm_pushes'] / max(1, share['pushes']):.0%}")


def shm_table(results: dict) -> str:
    """Same-host shared memory against tcp (fp32, the same run): round trip and async capacity (Adam)."""
    sizes = [r for r in results["sizes"] if "shm" in r and "fp32" in r["wire"]]
    if not sizes:
        return ""
    cpus = results["machine"]["cpus"]
    workers = list(sizes[0]["shm"]["capacity"])
    rows = [f"same-host shared memory vs tcp, fp32 (a step moves theta through /dev/shm: only small messages on the "
            f"socket); capacity = async pushes applied/s, Adam, 1 server + N pushing processes on {cpus} cores",
            "",
            f"| P | push+pull RT ms tcp / shm | shm speed-up | async pushes/s tcp ({' / '.join(workers)} workers) | "
            f"async pushes/s shm | shm / tcp | pulls / pushes via shm | server private memory / theta, shm | "
            f"oversubscribed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        tcp, shm = r["wire"]["fp32"], r["shm"]
        caps_t = [tcp["capacity"].get(n, {}).get("pushes_per_s") for n in workers]
        caps_s = [shm["capacity"][n]["pushes_per_s"] for n in workers]
        ratio = " / ".join(f"{b / a:.2f}x" if a else "-" for a, b in zip(caps_t, caps_s))
        over = [n for n in workers if shm["capacity"][n]["processes"] > cpus]
        shares = {"pulls": 0, "pushes": 0, "shm_pulls": 0, "shm_pushes": 0}
        for c in shm["capacity"].values():
            for k in shares:
                shares[k] += c["shm_share"][k]
        rows.append(f"| {r['params'] / 1e6:g}M | {tcp['round_trip_ms']} / {shm['round_trip_ms']} | "
                    f"{tcp['round_trip_ms'] / shm['round_trip_ms']:.2f}x | "
                    f"{' / '.join(str(c) for c in caps_t)} | {' / '.join(str(c) for c in caps_s)} | {ratio} | "
                    f"{_share(shares)} | "
                    f"{' / '.join(str(shm['capacity'][n].get('peak_anon_over_theta', '-')) for n in workers)} | "
                    f"{', '.join(f'{n} workers ({int(n) + 1} processes)' for n in over) or 'no'} |")
    return "\n".join(rows)


def shards_table(results: dict) -> str:
    """The shard table: aggregate push+pull throughput of K shards x N workers, per transport."""
    from paramserver.bench.shards import shm_note
    rows_in = results.get("shards") or []
    if not rows_in:
        return ""
    cpus = results["machine"]["cpus"]
    size = rows_in[0]["size"]
    rows = [f"aggregate push+pull throughput, K shard processes x N worker processes, theta = {size:,} float32 "
            f"({size * 4 / 1e6:g} MB) split over the shards, async sgd, {cpus} cores: a row with more processes than "
            "cores measures an oversubscribed machine",
            "",
            "| shards | workers | transport | steps/s | MB/s (pull + push) | pull ms | push ms | processes / cores "
            "| note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows_in:
        note = "; ".join(x for x in ("oversubscribed" if r["processes"] > cpus else "", shm_note(r)) if x)
        rows.append(f"| {r['shards']} | {r['workers']} | {r['transport']} | {r['steps_per_s']} | {r['mb_per_s']} | "
                    f"{r['pull_ms']} | {r['push_ms']} | {r['processes']} / {cpus} | {note} |")
    return "\n".join(rows)
