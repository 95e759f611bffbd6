"""`paramserver status` and `paramserver stop`: the commands that talk to a running server (or its shards).

Each takes ADDRESS (one server, or the shards' addresses comma-separated) and the CurveZMQ key files; every
address and key file is checked before anything is sent. `paramserver.cli` builds their parsers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common.config import ConfigError, check_address, check_resolves


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """ADDRESS, --timeout and the CurveZMQ key files of a command that talks to a running server."""
    p.add_argument("address", nargs="?", default=os.environ.get("PS_SERVER", "tcp://127.0.0.1:5555"),
                   help="server address, or the shards' addresses comma-separated (default: $PS_SERVER or "
                        "tcp://127.0.0.1:5555)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default: 5)")
    p.add_argument("--curve-server", default="", help="the server's public key file (CurveZMQ); status of K shards: "
                                                      "one file, or K comma-separated in the order of the addresses")
    p.add_argument("--curve-secret", default="", help="this client's secret key file (CurveZMQ; for stop under "
                                                      "--auth: an admin key, `paramserver keys DIR --admin NAME`)")


def _check_client_args(args: argparse.Namespace) -> None:
    """The address and keys of a tool that talks to a server (status, stop)."""
    if bool(args.curve_server) != bool(args.curve_secret):
        raise ConfigError("--curve-server and --curve-secret go together")
    try:
        check_address("ADDRESS", args.address, connect=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_resolves("ADDRESS", args.address)


def cmd_status(args: argparse.Namespace) -> int:
    from worker.client import PSClient, ServerUnavailable
    _check_client_args(args)
    addresses, keys = _shard_addresses(args)
    statuses = []
    for address, key in zip(addresses, keys):   # one status per shard (one address: the server's)
        with PSClient(address, server_timeout=args.timeout, request_timeout=min(1.0, args.timeout),
                      curve_server=key, curve_secret=args.curve_secret) as ps:
            try:
                statuses.append(ps.status())
            except ServerUnavailable as exc:
                print(f"paramserver status: {exc}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=2))
        return 0
    for address, st in zip(addresses, statuses):
        if len(addresses) > 1:
            shard = st.get("shard") or {}
            print(f"shard {shard.get('index')} of {shard.get('count')} at {address} (plan {shard.get('plan')}):")
        print(format_status(st))
    return 0


def format_status(st: dict) -> str:
    """The text of `paramserver status`: position, workers, rates, theta's CRC32, counters, checkpoint."""
    mode = st["mode"]
    if mode == "sync":
        where = f"step {st['step']}"
    else:
        clocks = ([w["clock"] for w in st["workers"].values() if w["state"] == "live"]
                  or [w["clock"] for w in st["workers"].values()] or [st["min_clock"]])
        where = f"clocks {min(clocks)}..{max(clocks)}  max gap {st['max_gap']}"
        if st.get("staleness_bound") is not None:
            where += f" (bound {st['staleness_bound']})"
    gate = ""
    if st.get("started") is False:
        gate = f"  waiting at the start gate: {st['registered']} of {st['num_workers']} workers registered"
    lines = [f"version {st['version']}  mode {mode}  {where}  live {st['live']}{gate}"]
    loss = f"{st['loss']:.4f}" if isinstance(st.get("loss"), (int, float)) else "-"
    handle = st.get("handle_ms") or {}
    lines.append(f"  {st['updates_per_s']} updates/s  train loss {loss}  theta crc32 {st.get('theta_crc32', '-')}  "
                 f"uptime {st['uptime_s']}s")
    if handle:
        lines.append("  handling ms per message: " + "  ".join(f"{q} {v}" for q, v in handle.items()))
    if st.get("time_s"):
        from paramserver.metrics import time_split
        busy = 100 * st["time_s"]["busy"] / st["uptime_s"] if st.get("uptime_s") else 0.0
        lines.append(f"  server thread {busy:.0f}% busy; {time_split(st['time_s'])}")
    for w, info in sorted(st["workers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"  worker {w}: {info['state']:5s} clock {info['clock']}  last seen {info['last_seen_s']}s ago")
    lines.append("  counters: " + (", ".join(f"{k}={v}" for k, v in sorted(st["counters"].items())) or "none"))
    ck, res = st.get("checkpoint") or {}, st.get("resumed_from") or {}
    if ck:
        lines.append(f"  checkpoint: {ck['path']} at version {ck['version']}")
    else:
        lines.append("  checkpoint: none written yet" + (f" (resumed from {res['path']} at version {res['version']})"
                                                          if res else ""))
    if ck and res:
        lines.append(f"  resumed from {res['path']} at version {res['version']}")
    return "\n".join(lines)


def _shard_addresses(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """ADDR as a shard list (one address: the server's) and the --curve-server key of each; every key file must
    exist before anything is sent (a stop must not halt some shards and then fail on another's key)."""
    from common.shards import parse_addresses, per_shard
    try:
        addresses = parse_addresses(args.address)
        keys = per_shard(args.curve_server, len(addresses), "--curve-server")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for flag, files in (("--curve-server", keys), ("--curve-secret", [args.curve_secret])):
        missing = [f for f in files if f and not os.path.exists(f)]
        if missing:
            raise ConfigError(f"{flag}: no such key file: {', '.join(missing)}")
    return addresses, keys


def cmd_stop(args: argparse.Namespace) -> int:
    from worker.client import PSClient, ServerError, ServerUnavailable
    _check_client_args(args)
    addresses, keys = _shard_addresses(args)
    failed = 0
    for address, key in zip(addresses, keys):   # every shard, even after one did not answer
        with PSClient(address, server_timeout=args.timeout, request_timeout=min(1.0, args.timeout),
                      curve_server=key, curve_secret=args.curve_secret) as ps:
            try:
                ps.shutdown()
            except (ServerUnavailable, ServerError) as exc:
                print(f"paramserver stop: error: {address}: {exc}", file=sys.stderr)
                failed += 1
                continue
        print(f"paramserver stop: {address} acknowledged SHUTDOWN; it writes its checkpoint and metrics, then exits")
    return 1 if failed else 0
