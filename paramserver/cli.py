"""`paramserver` command line: server, worker, cluster, bench, eval, sample, keys; status and stop live in
paramserver/remote.py (the commands that talk to a running server).

Every flag comes from a config dataclass (common/config.py); a bad value is rejected with the
allowed values, an unknown flag is rejected by name.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys

from common.config import (ENV_VARS, ClusterConfig, ConfigError, ServerConfig, WorkerConfig, add_arguments,
                           check_resolves, from_args, outer_defaults)
from common.tuning import short_openmp_spin
from paramserver.remote import add_client_arguments, cmd_status, cmd_stop

log = logging.getLogger("paramserver.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


class _Parser(argparse.ArgumentParser):
    """An unknown flag gets this (sub)command's name and a "did you mean"; errors print a short usage. A flag
    that belongs to another command (`worker --lr`) says so instead (`elsewhere`: flag -> why not here)."""

    elsewhere: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("-")]
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings]
            hints = []
            for a in unknown:
                name = a.split("=")[0]
                close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
                if name in self.elsewhere:
                    hints.append(f"{name} {self.elsewhere[name]}")
                elif close:
                    hints.append(f"{name}: did you mean {close[0]}?")
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return ns, extras

    def error(self, message):
        usage = self.format_usage()
        if usage.count("\n") > 3:    # the full usage of a command with 40 flags buries the error line
            usage = f"usage: {self.prog} [flags]   (every flag: {self.prog} --help)\n"
        self.exit(2, usage + f"{self.prog}: error: {message}\n")


def cmd_server(args: argparse.Namespace) -> int:
    short_openmp_spin()
    import zmq
    from paramserver.server import Server
    from common.tuning import keep_freed_memory, set_threads
    cfg = from_args(ServerConfig, args)
    _setup_logging(cfg.log_level)
    keep_freed_memory()
    set_threads(cfg.threads)
    server = Server(cfg)
    try:
        server.bind()
    except zmq.ZMQError as exc:
        hint = ("another process holds this port: pick another port, or port * for a free one"
                if exc.errno == zmq.EADDRINUSE else "check the host and port")
        raise ConfigError(f"--bind {cfg.bind}: {exc.strerror}; {hint}") from None
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    with server:
        print(f"paramserver listening on {server.address}", flush=True)
        server.serve_forever()
    if server.final_checkpoint_failed:   # (logged): a supervisor must not take this exit for a clean one
        print(f"paramserver server: error: the final checkpoint was not written to {cfg.checkpoint}; see the log",
              file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.train import run_worker, summarize
    from worker.client import ServerError, ServerUnavailable
    from common.tuning import keep_freed_memory
    cfg = from_args(WorkerConfig, args)
    _setup_logging(cfg.log_level)
    check_resolves("--server", cfg.server)
    keep_freed_memory()
    signal.signal(signal.SIGTERM, _exit_once)
    try:
        m = run_worker(cfg)
    except (ServerUnavailable, ServerError) as exc:
        print(f"paramserver worker {cfg.rank}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    s = summarize(m)
    print(f"worker {s['rank']} done: {s['steps']} steps in {s['wall_s']:.1f}s "
          f"(compute {s['compute_s']:.1f}s, wait {s['wait_s']:.1f}s, comm {s['comm_s']:.1f}s)", flush=True)
    return 0


def _exit_once(signum, frame):
    """SIGTERM: leave (say goodbye, write metrics) once; a second SIGTERM does not cut that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(143)


def cmd_cluster(args: argparse.Namespace) -> int:
    from paramserver.cluster import ClusterError, preflight, run_cluster
    ccfg = from_args(ClusterConfig, args)
    wcfg = from_args(WorkerConfig, args, num_workers=ccfg.workers, rank=0)
    scfg = from_args(ServerConfig, args, num_workers=ccfg.workers, bind="tcp://127.0.0.1:0",
                     **outer_defaults(args, wcfg.local_steps))
    _setup_logging(scfg.log_level)
    if wcfg.entry:   # a bad --entry is one clear line here rather than a failure in every worker's log
        from worker.entry import make_user_job
        make_user_job(wcfg)
    # Ctrl-C and SIGTERM both stop the cluster cleanly, even where SIGINT arrives ignored (background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    preflight(scfg, wcfg, ccfg)
    try:
        return run_cluster(ccfg, scfg, wcfg)
    except ClusterError as exc:
        print(f"paramserver cluster: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _interrupt(signum, frame):
    from paramserver.cluster import Terminated
    raise Terminated


def cmd_bench_consistency(args: argparse.Namespace) -> int:
    from paramserver.bench.consistency import BenchConfig, run_bench
    cfg = from_args(BenchConfig, args)
    _setup_logging("warning")
    run_bench(cfg)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from common.security import make_keys, server_key_names
    if args.shards < 1:
        raise ConfigError("--shards must be at least 1")
    names = (() if args.no_server else server_key_names(args.shards)) + tuple(args.clients or ())
    if not names and not args.admin:
        raise ConfigError("nothing to create: give --clients or --admin NAME, or drop --no-server")
    keys = make_keys(args.folder, names, admins=tuple(args.admin or ()), force=args.force)
    for name, (public, secret) in keys.items():
        print(f"{name}: public {public}  secret {secret} (0600)")
    print(f"admitted client keys (for the server's --auth): {os.path.join(args.folder, 'clients')}")
    if args.admin:
        print(f"admin keys (may send SHUTDOWN under --auth): {os.path.join(args.folder, 'admins')}")
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    from paramserver.bench.load import LoadConfig, print_load, run_load
    _setup_logging("warning")
    result = run_load(from_args(LoadConfig, args))
    print_load(result)
    return 0 if result["theta_exact"] and result["applied_acked"] == result["server_applied"] else 1


def cmd_bench_local(args: argparse.Namespace) -> int:
    from paramserver.bench.local import LocalBenchConfig, run_bench
    cfg = from_args(LocalBenchConfig, args)
    _setup_logging("warning")
    run_bench(cfg)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    short_openmp_spin()   # the same OpenMP setting as the server it measures (before torch is imported)
    from paramserver.bench.throughput import ThroughputConfig, print_throughput, run_throughput
    _setup_logging("warning")
    print_throughput(run_throughput(from_args(ThroughputConfig, args)))
    return 0


def cmd_bench_shards(args: argparse.Namespace) -> int:
    from paramserver.bench.shards import ShardsBenchConfig, print_overlap, print_shards, run_overlap, run_shards
    _setup_logging("warning")
    cfg = from_args(ShardsBenchConfig, args)
    print_shards(run_shards(cfg))
    if cfg.overlap_steps:
        print_overlap(run_overlap(cfg))
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    short_openmp_spin()   # the server processes it starts set it too (before torch is imported)
    from paramserver.bench.scale import ScaleConfig, main_scale
    _setup_logging("warning")
    report = main_scale(from_args(ScaleConfig, args))
    return 0 if all(r.get("complete") for r in report["runs"]) else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from worker.evaluate import evaluate_path
    if args.eval_batches < 1 or args.batch_size < 1:
        raise ConfigError("--eval-batches and --batch-size must be >= 1")
    r = evaluate_path(args.checkpoint, data=args.data, eval_batches=args.eval_batches, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    bits = f"  ({r['bits_per_byte']:.3f} bits/byte)" if "bits_per_byte" in r else ""
    print(f"{r['checkpoint']}: version {r['version']}, job {r['job']}\n  data: {r['data']}\n"
          f"  held-out loss {r['eval_loss']:.4f}{bits}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from worker.evaluate import load_job, sample_text
    from common.checkpoint import load_checkpoint
    if args.bytes < 1:
        raise ConfigError("--bytes must be >= 1")
    entry = (load_checkpoint(args.checkpoint).get("job") or {}).get("entry")
    if entry:   # known from the checkpoint alone: no need to import the user's module (it may not import here)
        raise ConfigError(f"this checkpoint's model is your own (--entry {entry}), not a text model: sample "
                          "generates text from a checkpoint of --job gpt")
    job, _ = load_job(args.checkpoint, data=args.data)
    prompt = args.prompt.encode() if args.prompt is not None else None
    text = sample_text(job, args.bytes, prompt=prompt, seed=args.seed, temperature=args.temperature)
    sys.stdout.write(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    env_help = "environment: " + "; ".join(f"{k} ({v[1]})" for k, v in ENV_VARS.items())
    parser = _Parser(prog="paramserver", allow_abbrev=False, epilog=env_help,
                     description="A parameter server for data-parallel training (sync, bounded staleness, async).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_training_commands(sub)
    _add_bench_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """server, worker, cluster: their flags are their config dataclasses' fields (common/config.py)."""
    p = sub.add_parser("server", help="run the parameter server", allow_abbrev=False)
    add_arguments(p, ServerConfig)
    p.set_defaults(func=cmd_server)
    p.elsewhere = {f: "is a worker flag: give it to `paramserver worker`, the same on every worker"
                   for f in _flags(WorkerConfig) - _flags(ServerConfig)}

    p = sub.add_parser("worker", help="run one worker", allow_abbrev=False)
    add_arguments(p, WorkerConfig)
    p.set_defaults(func=cmd_worker)
    p.elsewhere = {f: "is a server flag: the workers take the server's; give it to `paramserver server`"
                   for f in _flags(ServerConfig) - _flags(WorkerConfig)}

    p = sub.add_parser("cluster", help="run a server and N workers on this machine", allow_abbrev=False,
                       description="One server (or --shards K) and --workers N workers on this machine. It takes "
                                   "the server's and the workers' flags except those it sets itself: "
                                   + "; ".join(f"{f} ({why})" for f, why in CLUSTER_SETS.items()) + ".")
    add_arguments(p, ClusterConfig)
    add_arguments(p, ServerConfig, skip=CLUSTER_SKIPS)
    add_arguments(p, WorkerConfig, skip=CLUSTER_SKIPS)
    for a in p._actions:   # its help names only flags the cluster takes
        for old, new in (("HOST from --bind", "on 127.0.0.1"), ("--num-workers", "--workers")):
            a.help = a.help.replace(old, new) if a.help else a.help
    p.elsewhere = {f: f"is set by the cluster itself: {why}" for f, why in CLUSTER_SETS.items()}
    p.set_defaults(func=cmd_cluster)


#: the server's and workers' flags `paramserver cluster` sets itself, and what to use instead
CLUSTER_SETS = {
    "--bind": "the server binds a free port on 127.0.0.1",
    "--server": "the workers connect to the cluster's own server",
    "--rank": "the workers get ranks 0..N-1",
    "--num-workers": "use --workers N",
    "--checkpoint": "it writes OUT/checkpoint.pt; choose the folder with --out",
    "--metrics": "it writes OUT/metrics.json; choose the folder with --out",
    "--auto-resume": "continue a run with --resume OUT/checkpoint.pt",
    "--shard-index": "use --shards K",
    "--num-shards": "use --shards K",
    "--slowdown": "use --straggler F",
    "--curve-secret": "use --curve or --keys DIR",
    "--curve-server": "use --curve or --keys DIR",
    "--auth": "use --curve or --keys DIR",
    "--admins": "its own admin key is cluster in the --curve or --keys folder",
}
CLUSTER_SKIPS = tuple(f[2:].replace("-", "_") for f in CLUSTER_SETS) + ("out",)   # a worker's --out: the cluster's


def _flags(cls) -> set[str]:
    import dataclasses
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}


def _add_bench_commands(sub) -> None:
    """bench consistency | load | shards | throughput | scale | local: flags from each bench's config dataclass."""
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

    from paramserver.bench.shards import ShardsBenchConfig
    b = bench.add_parser("shards", allow_abbrev=False,
                         help="aggregate push+pull throughput over K shards x N workers, shared memory vs tcp")
    add_arguments(b, ShardsBenchConfig)
    b.set_defaults(func=cmd_bench_shards)
    from paramserver.bench.throughput import ThroughputConfig
    b = bench.add_parser("throughput", allow_abbrev=False,
                         help="the server's apply, snapshots and the wire against their limits (raw zmq, torch)")
    add_arguments(b, ThroughputConfig)
    b.set_defaults(func=cmd_bench_throughput)
    from paramserver.bench.scale import ScaleConfig
    b = bench.add_parser("scale", allow_abbrev=False,
                         help="paramserver (W workers sharing a device) vs single-process training at the same "
                              "global batch: samples/s, held-out loss, time split")
    add_arguments(b, ScaleConfig)
    b.set_defaults(func=cmd_bench_scale)
    from paramserver.bench.local import LocalBenchConfig
    b = bench.add_parser("local", allow_abbrev=False,
                         help="per-step sync vs local steps (local SGD, DiLoCo), async local steps and int8 pushes "
                              "at equal samples: loss, bytes per sample, communicating share, wall time")
    add_arguments(b, LocalBenchConfig)
    b.set_defaults(func=cmd_bench_local)


def _add_tool_commands(sub) -> None:
    """status, stop, eval, sample, keys: tools around a run."""
    p = sub.add_parser("status", help="show a running server's state", allow_abbrev=False)
    add_client_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop a running server (SHUTDOWN: it checkpoints and exits)", allow_abbrev=False)
    add_client_arguments(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("eval", help="held-out loss (and bits per byte) of a checkpoint", allow_abbrev=False)
    p.add_argument("checkpoint", help="a checkpoint written by the server (--checkpoint, or the cluster's)")
    p.add_argument("--data", default="", help="evaluate on this text file or folder instead of the job's data")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches (default: 8)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default: 16)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a gpt checkpoint", allow_abbrev=False)
    p.add_argument("checkpoint", help="a checkpoint of a gpt job")
    p.add_argument("--prompt", default=None, help="text to continue (default: a line from the held-out data)")
    p.add_argument("--bytes", type=int, default=300, help="bytes to generate (default: 300)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--data", default="", help="where the default prompt comes from, instead of the job's data")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("keys", help="create CurveZMQ key pairs for the server and clients", allow_abbrev=False)
    p.add_argument("folder", help="where to write NAME.key (public) and NAME.key_secret files")
    p.add_argument("--clients", nargs="*", default=["client"], help="client key names (default: client)")
    p.add_argument("--admin", nargs="+", default=[], metavar="NAME",
                   help="administrator key names: admitted like clients and copied into FOLDER/admins (the "
                        "server's admin keys under --auth: only they may send SHUTDOWN, e.g. `paramserver stop`)")
    p.add_argument("--no-server", action="store_true", help="do not create a server key pair (add keys to a "
                                                           "folder that has one)")
    p.add_argument("--shards", type=int, default=1, help="one server key pair per shard: server-shard0 .. "
                                                         "server-shard{K-1} instead of server (default: 1)")
    p.add_argument("--force", action="store_true", help="replace key files that exist already")
    p.set_defaults(func=cmd_keys)


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
    except KeyboardInterrupt as exc:   # 128 + the signal, as shells report it
        from paramserver.cluster import Terminated
        return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
