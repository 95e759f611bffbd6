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
from typing import Any, get_type_hints

MODES = ("sync", "ssp", "async")
AGGREGATES = ("sum", "mean")
OPTIMIZERS = ("sgd", "momentum", "adam")
SHARDINGS = ("contiguous", "random", "hash")
DEVICES = ("auto", "cpu", "cuda")
JOBS = ("gpt", "mlp", "linear")

#: environment variable -> (config field, what it means). Deployment identity only.
ENV_VARS = {
    "PS_ROLE": ("role", "what `paramserver` runs when no subcommand is given: server or worker"),
    "PS_SERVER": ("server", "address workers connect to, e.g. tcp://10.0.0.5:5555"),
    "PS_BIND": ("bind", "address the server binds, e.g. tcp://0.0.0.0:5555"),
    "PS_RANK": ("rank", "this worker's rank, 0..N-1 (its data shard); auto (or -1): the server assigns one"),
    "PS_NUM_WORKERS": ("num_workers", "number of workers in the job (shards; the server's start gate)"),
}


class ConfigError(ValueError):
    """A flag value, an environment variable or a file named by a flag that cannot be used."""


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field with its help text and, optionally, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown --{name.replace('_', '-')} {value!r}; choose one of {', '.join(map(str, choices))}")


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
    staleness: int = opt(3, "ssp: a worker may be at most this many clocks ahead of the slowest live worker")
    backup_workers: int = opt(0, "sync: apply each step after the first N-b gradients; later ones are dropped")
    aggregate: str = opt("mean", "sum: theta -= lr*sum(g_i); mean: theta -= lr*mean(g_i) (ssp/async: each push "
                                 "is applied with lr/N, N live workers)", AGGREGATES)
    optimizer: str = opt("adam", "update rule applied on the server", OPTIMIZERS)
    lr: float = opt(0.003, "learning rate alpha")
    momentum: float = opt(0.9, "momentum coefficient (--optimizer momentum)")
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
    track_divergence: bool = opt(True, "measure ||theta_server - theta_worker|| for every push (one pass over "
                                       "theta per push)")
    worker_timeout: float = opt(30.0, "seconds of silence after which a worker is declared dead")
    max_message_mb: float = opt(1024.0, "largest message accepted, in MiB (ZMQ_MAXMSGSIZE); a peer that sends "
                                        "more is disconnected")
    min_workers: int = opt(1, "sync: below this many live workers the server holds every pull and says so")
    curve_secret: str = opt("", "server secret key file (paramserver keys): encrypt all traffic with CurveZMQ")
    auth: str = opt("", "folder of client public key files: admit only these clients (needs --curve-secret)")
    log_level: str = opt("info", "logging level", ("debug", "info", "warning", "error"))

    def __post_init__(self):
        _validate_choices(self)
        if self.num_workers < 1:
            raise ValueError("--num-workers must be at least 1")
        if self.staleness < 0:
            raise ValueError("--staleness must be >= 0 (0 behaves like sync)")
        if not 0 <= self.backup_workers < self.num_workers:
            raise ValueError(f"--backup-workers must be in [0, {self.num_workers - 1}] for {self.num_workers} workers")
        if self.backup_workers and self.mode != "sync":
            raise ValueError("--backup-workers only applies to --mode sync")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.auth and not self.curve_secret:
            raise ValueError("--auth needs --curve-secret (the server's secret key file from `paramserver keys`)")
        if self.min_workers < 1:
            raise ValueError("--min-workers must be at least 1")
        if self.auto_resume and not self.checkpoint:
            raise ValueError("--auto-resume resumes from --checkpoint: give --checkpoint PATH too")
        if self.auto_resume and self.resume:
            raise ValueError("--auto-resume and --resume exclude each other (--auto-resume reads --checkpoint)")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("--metrics-port must be a TCP port in [1, 65535] (0: off)")


@dataclass
class JobConfig:
    """The model and data a worker trains (identical on every worker of a job)."""

    job: str = opt("gpt", "model and data: gpt (byte-level transformer on text), mlp (synthetic regression), "
                          "linear (convex least squares)", JOBS)
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


@dataclass
class WorkerConfig(JobConfig):
    """Configuration of `paramserver worker`."""

    server: str = opt("tcp://127.0.0.1:5555", "server address to connect to")
    rank: int = opt(0, "this worker's rank 0..N-1: picks its data shard and its worker id (-1: the server "
                       "assigns one at registration)")
    num_workers: int = opt(1, "number of workers (data shards)")
    shard: str = opt("random", "how samples are split over workers", SHARDINGS)
    batch_size: int = opt(16, "samples per micro-batch")
    accum: int = opt(1, "micro-batches accumulated into each pushed gradient")
    steps: int = opt(800, "pushes this worker makes (it leaves early if its shard runs out and --epochs is set)")
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
    curve_server: str = opt("", "the server's public key file: talk CurveZMQ (needs --curve-secret)")
    curve_secret: str = opt("", "this worker's secret key file (paramserver keys)")
    fault_drop: float = opt(0.0, "testing: drop this fraction of requests and replies (the resend path recovers)")
    fault_dup: float = opt(0.0, "testing: send this fraction of requests twice (the server answers once)")
    log_level: str = opt("info", "logging level", ("debug", "info", "warning", "error"))

    def __post_init__(self):
        super().__post_init__()
        if not -1 <= self.rank < self.num_workers:
            raise ValueError(f"--rank {self.rank} must be in [0, {self.num_workers - 1}] for --num-workers "
                             f"{self.num_workers}, or -1 (PS_RANK=auto) for a rank assigned by the server")
        if self.batch_size < 1 or self.accum < 1 or self.steps < 0:
            raise ValueError("--batch-size and --accum must be >= 1 and --steps >= 0")
        if self.slowdown < 1.0:
            raise ValueError("--slowdown is a slowdown factor and must be >= 1.0")
        if not 0.0 <= self.slowdown_prob <= 1.0:
            raise ValueError("--slowdown-prob is a fraction in [0, 1]")
        if bool(self.curve_server) != bool(self.curve_secret):
            raise ValueError("--curve-server and --curve-secret go together (server public key, own secret key)")
        if not (0 <= self.fault_drop < 1 and 0 <= self.fault_dup < 1):
            raise ValueError("--fault-drop and --fault-dup are fractions in [0, 1)")


@dataclass
class ClusterConfig:
    """Configuration of `paramserver cluster` beyond the server's and the workers' own flags."""

    workers: int = opt(4, "worker processes to start on this machine")
    out: str = opt("runs/cluster", "folder for the checkpoint, metrics.json and logs")
    straggler: float = opt(1.0, "slow down the last worker by this factor (1.0: no straggler)")
    sample_bytes: int = opt(300, "bytes of text to generate from the trained model at the end (gpt)")
    progress_every: float = opt(2.0, "seconds between progress lines")

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.straggler < 1.0:
            raise ValueError("--straggler is a slowdown factor and must be >= 1.0")


# ---------------------------------------------------------------------------------------------
# argparse derivation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per dataclass field of `cls` (defaults come from the dataclass)."""
    hints = get_type_hints(cls)
    seen = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in seen:
            continue
        typ = hints[f.name]
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {f.default!r})",
                                  "default": argparse.SUPPRESS, "dest": f.name}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(_flag(f.name), **kwargs)


def env_overrides(cls) -> dict[str, Any]:
    """Deployment identity from PS_* environment variables, for the fields `cls` has."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
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
