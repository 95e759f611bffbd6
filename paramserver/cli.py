"""`paramserver` command line: server, worker, cluster, status (and the subcommands of later modules).

Every flag comes from a config dataclass (common/config.py); a bad value is rejected with the
allowed values, an unknown flag is rejected by name.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from common.config import ENV_VARS, ClusterConfig, ConfigError, ServerConfig, WorkerConfig, add_arguments, from_args

log = logging.getLogger("paramserver.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def cmd_server(args: argparse.Namespace) -> int:
    from paramserver.server import Server
    cfg = from_args(ServerConfig, args)
    _setup_logging(cfg.log_level)
    server = Server(cfg)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    with server:
        print(f"paramserver listening on {server.address}", flush=True)
        server.serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.train import run_worker, summarize
    cfg = from_args(WorkerConfig, args)
    _setup_logging(cfg.log_level)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    m = run_worker(cfg)
    s = summarize(m)
    print(f"worker {s['rank']} done: {s['steps']} steps in {s['wall_s']:.1f}s "
          f"(compute {s['compute_s']:.1f}s, wait {s['wait_s']:.1f}s, comm {s['comm_s']:.1f}s)", flush=True)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from paramserver.cluster import run_cluster
    ccfg = from_args(ClusterConfig, args)
    scfg = from_args(ServerConfig, args, num_workers=ccfg.workers, bind="tcp://127.0.0.1:0")
    wcfg = from_args(WorkerConfig, args, num_workers=ccfg.workers, rank=0)
    _setup_logging(scfg.log_level)
    # Ctrl-C and SIGTERM both stop the cluster cleanly, even where SIGINT arrives ignored (background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    return run_cluster(ccfg, scfg, wcfg)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_bench_consistency(args: argparse.Namespace) -> int:
    from paramserver.bench.consistency import BenchConfig, run_bench
    cfg = from_args(BenchConfig, args)
    _setup_logging("warning")
    run_bench(cfg)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from common.security import make_keys
    keys = make_keys(args.folder, tuple(["server"] + args.clients))
    for name, (public, secret) in keys.items():
        print(f"{name}: public {public}  secret {secret}")
    print(f"admitted client keys (for the server's --auth): {os.path.join(args.folder, 'clients')}")
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    from paramserver.bench.load import LoadConfig, print_load, run_load
    _setup_logging("warning")
    result = run_load(from_args(LoadConfig, args))
    print_load(result)
    return 0 if result["theta_exact"] and result["applied_acked"] == result["server_applied"] else 1


def cmd_status(args: argparse.Namespace) -> int:
    from worker.client import PSClient, ServerUnavailable
    if bool(args.curve_server) != bool(args.curve_secret):
        raise ConfigError("--curve-server and --curve-secret go together")
    with PSClient(args.address, server_timeout=args.timeout, request_timeout=min(1.0, args.timeout),
                  curve_server=args.curve_server, curve_secret=args.curve_secret) as ps:
        try:
            st = ps.status()
        except ServerUnavailable as exc:
            print(f"paramserver status: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"version {st['version']}  mode {st['mode']}  step {st['step']}  live {st['live']}  "
          f"min clock {st['min_clock']}  max gap {st['max_gap']}  {st['updates_per_s']} updates/s  "
          f"uptime {st['uptime_s']}s")
    for w, info in sorted(st["workers"].items(), key=lambda kv: int(kv[0])):
        print(f"  worker {w}: {info['state']:5s} clock {info['clock']}  last seen {info['last_seen_s']}s ago")
    print("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(st["counters"].items())))
    ck = st.get("checkpoint") or {}
    print(f"  checkpoint: {ck.get('path', 'none')}" + (f" at version {ck['version']}" if ck else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    env_help = "environment: " + "; ".join(f"{k} ({v[1]})" for k, v in ENV_VARS.items())
    parser = argparse.ArgumentParser(prog="paramserver", allow_abbrev=False, epilog=env_help,
                                     description="A parameter server for data-parallel training "
                                                 "(sync, bounded staleness, async).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("server", help="run the parameter server", allow_abbrev=False)
    add_arguments(p, ServerConfig)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("worker", help="run one worker", allow_abbrev=False)
    add_arguments(p, WorkerConfig)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("cluster", help="run a server and N workers on this machine", allow_abbrev=False)
    add_arguments(p, ClusterConfig)
    add_arguments(p, ServerConfig, skip=("bind", "num_workers", "metrics", "checkpoint"))
    add_arguments(p, WorkerConfig, skip=("server", "rank", "num_workers", "out", "slowdown"))
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("bench", help="benchmarks that print figures", allow_abbrev=False)
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from paramserver.bench.consistency import BenchConfig
    b = bench.add_parser("consistency", allow_abbrev=False,
                         help="sync vs backup workers vs ssp vs async vs DDP, with and without a straggler")
    add_arguments(b, BenchConfig)
    b.set_defaults(func=cmd_bench_consistency)

    from paramserver.bench.load import LoadConfig
    b = bench.add_parser("load", allow_abbrev=False,
                         help="many lightweight workers against one server: throughput, latency, exactness")
    add_arguments(b, LoadConfig)
    b.set_defaults(func=cmd_bench_load)

    p = sub.add_parser("status", help="show a running server's state", allow_abbrev=False)
    p.add_argument("address", nargs="?", default=os.environ.get("PS_SERVER", "tcp://127.0.0.1:5555"),
                   help="server address (default: $PS_SERVER or tcp://127.0.0.1:5555)")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default: 5)")
    p.add_argument("--curve-server", default="", help="the server's public key file (CurveZMQ)")
    p.add_argument("--curve-secret", default="", help="this client's secret key file (CurveZMQ)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="create CurveZMQ key pairs for the server and clients", allow_abbrev=False)
    p.add_argument("folder", help="where to write NAME.key (public) and NAME.key_secret files")
    p.add_argument("--clients", nargs="+", default=["client"], help="client key names (default: client)")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        role = os.environ.get("PS_ROLE")
        if role:
            if role not in ("server", "worker"):
                parser.error(f"PS_ROLE={role!r} is not a role; choose server or worker")
            argv = [role] + argv
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:   # say what to change, no traceback
        parser.exit(2, f"paramserver {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
