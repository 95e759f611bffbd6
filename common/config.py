"""One config dataclass per process; `--flag` options are derived from the fields.

Each field carries its help text (and, where it has them, its allowed values) in its metadata.
Environment variables carry deployment identity only (see ENV_VARS and the README table); a
flag given on the command line wins over the environment.

Usage::

    parser = argparse.ArgumentParser(); add_arguments(parser, ServerConfig)
    cfg = from_args(ServerConfig, parser.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

from common.shards import parse_addresses, per_shard

MODES = ("sync", "ssp", "async")
AGGREGATES = ("sum", "mean")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "delayed-nesterov", "adam")
INNER_OPTIMIZERS = ("adamw", "adam", "sgd")
COMPRESSIONS = ("none", "int8")
SHARDINGS = ("contiguous", "random", "hash")
DEVICES = ("auto", "cpu", "cuda")
JOBS = ("gpt", "mlp", "linear")
DEFAULT_STALENESS = 3   # --mode ssp without --staleness

#: environment variable -> (config field, what it means). Deployment identity only.
ENV_VARS = {
    "PS_ROLE": ("role", "what `paramserver` runs when no subcommand is given: server or worker"),
    "PS_SERVER": ("server", "address workers connect to, e.g. tcp://10.0.0.5:5555"),
    "PS_BIND": ("bind", "address the server binds, e.g. tcp://0.0.0.0:5555"),
    "PS_RANK": ("rank", "this worker's rank, 0..N-1 (its data shard); auto (or -1): the server assigns one"),
    "PS_NUM_WORKERS": ("num_workers", "number of workers in the job (shards; the server's start gate)"),
    "PS_SHARD_INDEX": ("shard_index", "which part of theta this server holds, 0..K-1 (see PS_NUM_SHARDS)"),
    "PS_NUM_SHARDS": ("num_shards", "number of server shards theta is split over"),
}


class ConfigError(ValueError):
    """A flag value, an environment variable or a file named by a flag that cannot be used."""


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field with its help text and, optionally, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown --{name.replace('_', '-')} {value!r}; choose one of {', '.join(map(str, choices))}")


TRANSPORTS = ("tcp", "ipc", "inproc")


def check_address(flag: str, value: str, connect: bool = False) -> None:
    """Raise ValueError unless every comma-separated address in `value` names a ZeroMQ transport. An address to
    `connect` to needs a real port (1..65535); one to bind may also say 0 or * (a free one)."""
    for addr in value.split(","):
        addr = addr.strip()
        scheme, sep, rest = addr.partition("://")
        if not sep:
            raise ValueError(f"{flag} {addr!r} has no transport: write tcp://{addr}")
        if scheme not in TRANSPORTS or not rest:
            raise ValueError(f"{flag} {addr!r}: use tcp://HOST:PORT (or ipc://PATH)")
        if scheme == "tcp":   # ZeroMQ would retry a port it cannot use in silence until --server-timeout
            host, colon, port = rest.rpartition(":")
            if not colon or not host:
                raise ValueError(f"{flag} {addr!r} has no port: write tcp://{rest}:PORT")
            if connect and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"{flag} {addr!r}: port {port!r} is not a TCP port to connect to (1..65535: the port "
                                 "the server listens on, as its 'listening on' line says)")
            if port != "*" and not (port.isdigit() and int(port) <= 65535):
                raise ValueError(f"{flag} {addr!r}: port {port!r} is not a TCP port (0..65535, or * for a free one)")


def check_resolves(flag: str, addresses: str) -> None:
    """Raise ConfigError when a tcp:// host in `addresses` does not resolve: ZeroMQ would retry it in silence."""
    import socket
    for addr in addresses.split(","):
        scheme, _, rest = addr.strip().partition("://")
        host = rest.rsplit(":", 1)[0].strip("[]")
        if scheme == "tcp" and host and host != "*":
            try:
                socket.getaddrinfo(host, None)
            except socket.gaierror as exc:
                raise ConfigError(f"{flag} {addr.strip()!r}: host {host!r} does not resolve ({exc.strerror})") from None


def _validate_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        if f.metadata.get("choices"):
            _check_choice(f.name, getattr(cfg, f.name), f.metadata["choices"])


@dataclass
class ServerConfig:
    """Configuration of `paramserver server`."""

    bind: str = opt("tcp://127.0.0.1:5555", "address to bind; loopback by default (use tcp://0.0.0.0:PORT to "
                                            "accept other machines). Port * picks a free one")
    num_workers: int = opt(1, "workers expected: no pull is answered until this many have registered")
    mode: str = opt("sync", "consistency model", MODES)
    staleness: int | None = opt(None, "ssp: a worker may be at most this many clocks ahead of the slowest live worker "
                                      f"(default: {DEFAULT_STALENESS}; refused with another --mode)")
    backup_workers: int = opt(0, "sync: apply each step after the first N-b gradients; later ones are dropped")
    aggregate: str = opt("mean", "sum: theta -= lr*sum(g_i); mean: theta -= lr*mean(g_i) (ssp/async: each push "
                                 "is applied with lr/N, N live workers)", AGGREGATES)
    optimizer: str = opt("adam", "update rule applied on the server; with workers' --local-steps H > 1 it is the "
                                 "outer optimizer, applied to the mean pseudo-gradient (sgd with --lr 1: averaging, "
                                 "classic local SGD; nesterov: DiLoCo; delayed-nesterov: ssp/async only, momentum "
                                 "updated every N arrivals)", OPTIMIZERS)
    lr: float = opt(0.003, "learning rate alpha (the outer learning rate with --local-steps > 1)")
    momentum: float = opt(0.9, "momentum coefficient (--optimizer momentum, nesterov, delayed-nesterov)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    resume: str = opt("", "checkpoint to restore theta, optimizer state, version and clocks from")
    checkpoint: str = opt("", "path of the checkpoint written on shutdown (and periodically); empty: none")
    checkpoint_every: float = opt(0.0, "seconds between periodic checkpoints (0: only on shutdown)")
    auto_resume: bool = opt(False, "resume from --checkpoint when that file exists, else start fresh (a restarted "
                                   "server continues on its own)")
    metrics_port: int = opt(0, "serve Prometheus metrics on http://HOST:PORT/metrics, HOST from --bind "
                               "(0: off)")
    metrics: str = opt("", "path of the JSON metrics file written on shutdown; empty: none")
    max_gradients: int = opt(0, "end the job once this many gradients have been applied: every worker is told "
                                "to stop (0: no limit; workers stop after their --steps)")
    track_divergence: bool = opt(True, "measure ||theta_server - theta_worker|| of pushes (exact up to 65536 values, "
                                       "else estimated from 65536 sampled coordinates); sync: 0 for every applied "
                                       "gradient, at no cost; ssp/async: see --divergence-every")
    divergence_every: int = opt(0, "ssp/async: measure the divergence of every K-th pull's push per worker; 0 (auto): "
                                   "of the pushes whose pull comes while divergence has cost at most 5 percent of "
                                   "the server's apply time so far")
    worker_timeout: float = opt(30.0, "seconds of silence after which a worker is declared dead")
    max_message_mb: float = opt(0.0, "largest message frame accepted, in MiB (ZMQ_MAXMSGSIZE); a peer that sends "
                                     "more is disconnected. 0: automatic: the largest frame the protocol sends (a "
                                     "24 MiB chunk) plus the 1 MiB header limit, or less when a resumed server "
                                     "knows theta's largest tensor")
    min_workers: int = opt(1, "sync: below this many live workers the server holds every pull and says so")
    max_workers: int = opt(0, "most worker ids the server keeps (live, dead or left); more registrations are "
                              "refused. 0: 2 x --num-workers + 4")
    step_timeout: float = opt(0.0, "sync: a live worker that has not pushed for the current step within this many "
                                   "seconds is treated as dead, so a hung worker cannot hold the barrier (0: off)")
    resume_override: bool = opt(False, "--resume: accept a checkpoint written with another --mode, --aggregate, "
                                       "--lr or --num-workers (refused by default)")
    curve_secret: str = opt("", "server secret key file (paramserver keys): encrypt all traffic with CurveZMQ")
    auth: str = opt("", "folder of client public key files: admit only these clients (needs --curve-secret)")
    admins: str = opt("", "--auth: folder of public key files allowed to send SHUTDOWN (default: the admins "
                          "folder beside the --auth folder, made by `paramserver keys --admin NAME`)")
    log_level: str = opt("info", "logging level", ("debug", "info", "warning", "error"))
    shard_index: int = opt(0, "this server holds part shard_index of theta, 0..num_shards-1 (workers list the "
                              "shard addresses in this order)")
    num_shards: int = opt(1, "number of server shards theta is split over (each a `paramserver server`)")
    shm: bool = opt(True, "answer workers on this host through shared memory (/dev/shm) when they offer it")
    max_pushes_in_flight: int = opt(2, "workers that may send a gradient at once (each asks first: ZeroMQ receives a "
                                       "message whole, so this bounds the gradients in the server's memory "
                                       "whatever the number of workers); 0: no limit")
    snapshot_buffers: int = opt(2, "theta-sized buffers that pulls still being sent may hold besides theta: an "
                                   "update that needs one more waits for the oldest send to finish (a reader "
                                   "stalled for --snapshot-wait s is not waited for). Bounds memory to theta + optimizer "
                                   "state + this many. 0: never copy theta, updates wait for its sends")
    snapshot_wait: float = opt(0.5, "longest an update waits for a send of theta (--snapshot-buffers); a send older "
                                    "than this counts as a slow or stalled reader and is not waited for. Raise it "
                                    "for slow networks (a 100 MB theta takes 0.8 s over 1 GbE)")
    threads: int = opt(0, "torch threads for the update (0: torch's default, one per core; `paramserver cluster` "
                          "gives cores / (workers + shards)). Fewer threads than cores avoids stalls when workers "
                          "share the machine")

    def __post_init__(self):
        _validate_choices(self)
        if self.max_pushes_in_flight < 0:
            raise ValueError(f"--max-pushes-in-flight must be >= 0 (0: no limit), not {self.max_pushes_in_flight}")
        if self.snapshot_wait < 0:
            raise ValueError(f"--snapshot-wait must be >= 0 seconds, not {self.snapshot_wait}")
        if self.snapshot_buffers < 0:
            raise ValueError(f"--snapshot-buffers must be >= 0, not {self.snapshot_buffers}")
        if self.divergence_every < 0:
            raise ValueError(f"--divergence-every must be >= 0 (0: automatic, K: every K-th pull), not "
                             f"{self.divergence_every}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: torch's default), not {self.threads}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index {self.shard_index} must be in [0, {self.num_shards - 1}] for "
                             f"--num-shards {self.num_shards}")
        if self.num_workers < 1:
            raise ValueError("--num-workers must be at least 1")
        if self.staleness is not None and self.staleness < 0:
            raise ValueError("--staleness must be >= 0 (0 behaves like sync)")
        if not 0 <= self.backup_workers < self.num_workers:
            raise ValueError(f"--backup-workers must be in [0, {self.num_workers - 1}] for {self.num_workers} workers")
        if self.backup_workers and self.mode != "sync":
            raise ValueError("--backup-workers only applies to --mode sync")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.optimizer == "delayed-nesterov" and self.mode == "sync":
            raise ValueError("--optimizer delayed-nesterov applies each push on arrival (--mode ssp or async); "
                             "with --mode sync use --optimizer nesterov")
        if self.auth and not self.curve_secret:
            raise ValueError("--auth needs --curve-secret (the server's secret key file from `paramserver keys`)")
        if self.min_workers < 1:
            raise ValueError("--min-workers must be at least 1")
        if self.max_workers == 0:
            self.max_workers = 2 * self.num_workers + 4
        if self.max_workers < self.num_workers:
            raise ValueError(f"--max-workers {self.max_workers} is below --num-workers {self.num_workers}")
        if self.step_timeout < 0 or self.max_message_mb < 0:
            raise ValueError("--step-timeout and --max-message-mb must be >= 0")
        if self.admins and not self.auth:
            raise ValueError("--admins needs --auth (without --auth every client may send SHUTDOWN)")
        check_address("--bind", self.bind)
        if self.staleness is not None and self.mode != "ssp":   # None: not given (any value given is refused)
            raise ValueError("--staleness only applies to --mode ssp")
        if self.staleness is None and self.mode == "ssp":
            self.staleness = DEFAULT_STALENESS
        if self.mode != "sync" and (self.min_workers != 1 or self.step_timeout > 0):
            flag = "--min-workers" if self.min_workers != 1 else "--step-timeout"
            raise ValueError(f"{flag} only applies to --mode sync (this server runs --mode {self.mode})")
        if self.min_workers > self.num_workers:
            raise ValueError(f"--min-workers {self.min_workers} is more than the job's {self.num_workers} workers, so "
                             f"sync would hold every pull forever: give --min-workers 1..{self.num_workers}")
        if self.auto_resume and not self.checkpoint:
            raise ValueError("--auto-resume resumes from --checkpoint: give --checkpoint PATH too")
        if self.auto_resume and self.resume:
            raise ValueError("--auto-resume and --resume exclude each other (--auto-resume reads --checkpoint)")
        if self.resume and os.path.isdir(self.resume):
            raise ValueError(f"--resume {self.resume!r} is a folder; give the checkpoint file")
        if self.resume and not os.path.exists(self.resume):
            raise ValueError(f"--resume {self.resume!r}: no such file")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("--metrics-port must be a TCP port in [1, 65535] (0: off)")


@dataclass
class JobConfig:
    """The model and data a worker trains (identical on every worker of a job)."""

    job: str = opt("gpt", "model and data: gpt (byte-level transformer on text), mlp (synthetic regression), "
                          "linear (convex least squares)", JOBS)
    entry: str = opt("", "your own model instead of --job: package.module:function returning a UserJob (see the "
                         "README, 'Your own model')")
    data: str = opt("", "gpt: a text file or folder of text files; empty: the Python standard library's .py sources")
    max_bytes: int = opt(8_000_000, "gpt: read at most this many bytes of the corpus (0: all)")
    n_layer: int = opt(2, "gpt: transformer blocks")
    n_head: int = opt(4, "gpt: attention heads")
    n_embd: int = opt(64, "gpt: embedding width")
    context: int = opt(64, "gpt: context length in bytes")
    n_samples: int = opt(2048, "mlp/linear: synthetic data set size")
    n_features: int = opt(16, "mlp/linear: input dimension")
    hidden: int = opt(32, "mlp: hidden width")
    seed: int = opt(0, "seed for model init, data sharding and batch order")

    def __post_init__(self):
        _validate_choices(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        if self.entry and (self.entry.count(":") != 1 or not all(self.entry.split(":"))):
            raise ValueError(f"--entry {self.entry!r} must be package.module:function")


@dataclass
class WorkerConfig(JobConfig):
    """Configuration of `paramserver worker`."""

    server: str = opt("tcp://127.0.0.1:5555", "server address to connect to; with K shards, the K shard addresses "
                                              "comma-separated in shard order")
    rank: int = opt(0, "this worker's rank 0..N-1: picks its data shard and its worker id (-1: the server "
                       "assigns one at registration)")
    num_workers: int = opt(1, "number of workers (data shards)")
    shard: str = opt("random", "how samples are split over workers", SHARDINGS)
    batch_size: int = opt(16, "samples per micro-batch")
    accum: int = opt(1, "micro-batches accumulated into each pushed gradient")
    steps: int = opt(800, "steps this worker trains, one push each (with --local-steps H: one push every H); it "
                          "leaves early if its shard runs out and --epochs is set")
    epochs: int = opt(0, "stop after this many passes over the shard (0: no limit, --steps decides)")
    device: str = opt("auto", "where to compute: auto picks cuda when available", DEVICES)
    eval_every: int = opt(50, "rank 0: evaluate held-out loss every this many steps (0: never)")
    eval_batches: int = opt(8, "held-out batches per evaluation")
    slowdown: float = opt(1.0, "straggler factor: sleep (factor-1) x compute time after a slowed step")
    slowdown_prob: float = opt(1.0, "fraction of steps that are slowed, drawn per step from a seeded generator "
                                    "(1.0: every step, a persistent straggler; below 1: transient delays)")
    out: str = opt("", "folder for this worker's metrics JSON; empty: none")
    request_timeout: float = opt(2.0, "seconds before an unanswered request is sent again (with backoff)")
    server_timeout: float = opt(120.0, "give up when the server has not answered for this many seconds")
    heartbeat: float = opt(2.0, "seconds between heartbeats")
    log_every: int = opt(10, "print a progress line every this many steps (0: quiet)")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    curve_server: str = opt("", "the server's public key file: talk CurveZMQ (needs --curve-secret); with K shards "
                                "one file for all, or K files comma-separated in the order of --server")
    curve_secret: str = opt("", "this worker's secret key file (paramserver keys)")
    shm: bool = opt(True, "same host as a server: pull theta and push gradients through shared memory (/dev/shm); "
                          "falls back to the socket by itself when the server is elsewhere")
    overlap: bool = opt(False, "overlap communication with computation: a push runs in the background while the "
                                "worker goes on (sync/ssp: same theta); async also fetches the next theta while "
                                "computing (one more version of staleness)")
    wire_dtype: str = opt("fp32", "how gradients go to the server and theta comes back: fp32, or bf16 / fp16 "
                                  "(half the bytes; the server keeps fp32 theta and optimizer state; fp16 turns "
                                  "values beyond +-65504 into Inf, which the server refuses)", ("fp32", "bf16", "fp16"))
    local_steps: int = opt(1, "inner optimizer steps per push: with H > 1 the worker pulls theta, takes H steps of "
                              "--inner-optimizer on its own batches and pushes the pseudo-gradient theta_pulled - "
                              "theta_local, which the server's --optimizer applies as the outer step (DiLoCo, local "
                              "SGD). 1: push every gradient (the server is the only optimizer)")
    inner_optimizer: str = opt("adamw", "--local-steps > 1: the worker's own optimizer (its state is kept across "
                                        "rounds, and starts fresh when the worker process restarts)",
                               INNER_OPTIMIZERS)
    inner_lr: float = opt(0.003, "--local-steps > 1: the inner optimizer's learning rate")
    inner_weight_decay: float = opt(0.0, "--local-steps > 1: the inner optimizer's weight decay (adamw: decoupled)")
    compress: str = opt("none", "push compression: int8 sends each gradient (or pseudo-gradient) as 8-bit blocks "
                                "with one float32 absmax scale per block (about a quarter of fp32's bytes); what "
                                "rounding leaves out is kept on the worker and added to its next push (error "
                                "feedback), so nothing is lost over time", COMPRESSIONS)
    link_mbps: float = opt(0.0, "benchmarks: emulate a link of this many Mb/s per worker by pacing the bytes this "
                                "worker sends and receives (an emulation on one machine, never a real limit; 0: off)")
    fault_drop: float = opt(0.0, "testing: drop this fraction of requests and replies (the resend path recovers)")
    fault_dup: float = opt(0.0, "testing: send this fraction of requests twice (the server answers once)")
    log_level: str = opt("info", "logging level", ("debug", "info", "warning", "error"))

    def __post_init__(self):
        super().__post_init__()
        if not -1 <= self.rank < self.num_workers:
            raise ValueError(f"--rank {self.rank} must be in [0, {self.num_workers - 1}] for --num-workers "
                             f"{self.num_workers}, or -1 (PS_RANK=auto) for a rank assigned by the server")
        if self.local_steps < 1:
            raise ValueError(f"--local-steps must be >= 1 (1: push every gradient), not {self.local_steps}")
        if self.inner_lr <= 0 or self.inner_weight_decay < 0:
            raise ValueError("--inner-lr must be positive and --inner-weight-decay >= 0")
        if self.link_mbps < 0:
            raise ValueError(f"--link-mbps must be >= 0 (0: off), not {self.link_mbps}")
        if self.overlap and self.local_steps > 1:
            raise ValueError("--overlap hides the communication of per-step training; with --local-steps "
                             f"{self.local_steps} a round would start from a θ fetched before its own push: drop "
                             "--overlap (local steps communicate once per round)")
        for flag, value, least in (("--batch-size", self.batch_size, 1), ("--accum", self.accum, 1),
                                   ("--steps", self.steps, 0)):
            if value < least:   # name only the flag that is wrong
                raise ValueError(f"{flag} must be >= {least}, not {value}")
        if self.slowdown < 1.0:
            raise ValueError("--slowdown is a slowdown factor and must be >= 1.0")
        if not 0.0 <= self.slowdown_prob <= 1.0:
            raise ValueError("--slowdown-prob is a fraction in [0, 1]")
        if bool(self.curve_server) != bool(self.curve_secret):
            raise ValueError("--curve-server and --curve-secret go together (server public key, own secret key)")
        if not (0 <= self.fault_drop < 1 and 0 <= self.fault_dup < 1):
            raise ValueError("--fault-drop and --fault-dup are fractions in [0, 1)")
        per_shard(self.curve_server, len(parse_addresses(self.server)), "--curve-server")
        check_address("--server", self.server, connect=True)


@dataclass
class ClusterConfig:
    """Configuration of `paramserver cluster` beyond the server's and the workers' own flags."""

    workers: int = opt(4, "worker processes to start on this machine")
    out: str = opt("runs/cluster", "folder for the checkpoint, metrics.json and logs")
    straggler: float = opt(1.0, "slow down the last worker by this factor (1.0: no straggler)")
    sample_bytes: int = opt(300, "bytes of text to generate from the trained model at the end (gpt)")
    progress_every: float = opt(2.0, "seconds between progress lines")
    curve: bool = opt(False, "encrypt with CurveZMQ and admit only this run's keys: creates OUT/keys (a server "
                             "key, with --shards K one per shard, one key per worker, an admin key for the "
                             "cluster's own monitor and SHUTDOWN)")
    keys: str = opt("", "like --curve, with the keys in this folder: server (with --shards K: server-shard0.."
                        "K-1), worker0..N-1 and cluster (admin) key files are used where they exist and created "
                        "where they do not")
    shards: int = opt(1, "server processes theta is split over (one `paramserver server --shard-index I "
                         "--num-shards K` each)")
    overwrite: bool = opt(False, "replace an earlier run in --out (its checkpoint, metrics); without it such a "
                                 "folder is refused unless --resume continues the run there")

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.straggler < 1.0:
            raise ValueError("--straggler is a slowdown factor and must be >= 1.0")


#: the server's optimizer when workers take --local-steps H > 1 and no --optimizer / --lr is given
#: (`paramserver cluster`, the benches): plain averaging, chosen by measurement (docs/benchmarks.md, bench local)
LOCAL_SGD_OUTER = {"optimizer": "sgd", "lr": 1.0}


def outer_defaults(ns: argparse.Namespace, local_steps: int) -> dict:
    """The outer optimizer for a job of --local-steps `local_steps` > 1 without --optimizer: sgd, at lr 1 unless
    --lr is given. A given --optimizer is taken as it is, with the server's --lr (given or default)."""
    if local_steps <= 1 or "optimizer" in vars(ns):
        return {}
    return {k: v for k, v in LOCAL_SGD_OUTER.items() if k not in vars(ns)}


# ---------------------------------------------------------------------------------------------
# argparse derivation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(hint):
    """The type a flag's text converts to: `int | None` (None: not given) takes an int."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def _or_not_given(typ):
    """A flag whose default is None ("not given") also takes an empty value as not given: a deployment template
    can pass `--staleness=$STALENESS` whatever the mode, and leave STALENESS empty outside ssp."""
    def convert(text: str):
        return None if text.strip() == "" else typ(text)
    convert.__name__ = typ.__name__   # argparse names the type in its error ("invalid int value")
    return convert


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per dataclass field of `cls` (defaults come from the dataclass; a field whose default is
    None, "not given", states its effective default in its help)."""
    hints = {name: _value_type(hint) for name, hint in get_type_hints(cls).items()}
    seen = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in seen:
            continue
        typ = hints[f.name]
        shown = "" if f.default is None else f" (default: {f.default!r})"
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')}{shown}",
                                  "default": argparse.SUPPRESS, "dest": f.name}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _or_not_given(typ) if f.default is None else typ
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(_flag(f.name), **kwargs)


def env_overrides(cls) -> dict[str, Any]:
    """Deployment identity from PS_* environment variables, for the fields `cls` has."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = {name: _value_type(hint) for name, hint in get_type_hints(cls).items()}
    out = {}
    for var, (fname, _) in ENV_VARS.items():
        if var in os.environ and fname in names:
            raw = os.environ[var]
            if var == "PS_RANK" and raw.strip().lower() == "auto":
                raw = "-1"
            try:
                out[fname] = hints[fname](raw)
            except ValueError:
                raise ValueError(f"environment variable {var}={raw!r} is not a valid {hints[fname].__name__}") from None
    return out


def from_args(cls, ns: argparse.Namespace, **extra):
    """Build `cls` from defaults < environment < parsed flags < extra; a bad value raises ConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        values = env_overrides(cls)
        values.update({k: v for k, v in vars(ns).items() if k in names})
        values.update({k: v for k, v in extra.items() if k in names})
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def to_argv(cfg, skip: tuple[str, ...] = ()) -> list[str]:
    """The --flag list that reproduces `cfg` (fields equal to their default are left out)."""
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [_flag(f.name), str(value)]
    return argv


def subset(cfg, cls, **extra):
    """Build a `cls` config from the fields of `cfg` that `cls` also has."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    values.update(extra)
    return cls(**values)
