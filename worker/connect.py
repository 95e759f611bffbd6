"""Connecting your own worker: who it is (server, rank, shards) from flags or PS_* variables, and its client.

This module needs no torch (numpy, pyzmq, msgpack only): a numpy worker uses it as is, and the
PyTorch API (`worker/api.py`) builds on it. Settings resolve as everywhere in paramserver:
defaults < environment (PS_SERVER, PS_RANK, PS_NUM_WORKERS) < flags < keyword arguments.

Usage::

    cfg = worker_config()                   # or worker_config(parser.parse_args()) after add_arguments(parser)
    with connect(cfg) as client:            # PSClient verbs: register / pull / push / leave
        client.register(init={"w": w0})
"""
from __future__ import annotations

import argparse
import dataclasses

from common.config import ConfigError, WorkerConfig, add_arguments as _add_fields, from_args
from worker.client import PSClient

#: the WorkerConfig fields a user's own worker takes (those this build's WorkerConfig has)
API_FIELDS = ("server", "rank", "num_workers", "shard", "seed", "accum", "request_timeout",
              "server_timeout", "heartbeat", "curve_server", "curve_secret", "wire_dtype")


def _fields() -> list[str]:
    have = {f.name for f in dataclasses.fields(WorkerConfig)}
    return [name for name in API_FIELDS if name in have]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the worker flags (--server, --rank, --num-workers, --shard, --seed, --accum, ...) to your parser."""
    _add_fields(parser, WorkerConfig, skip=tuple(f.name for f in dataclasses.fields(WorkerConfig)
                                                 if f.name not in _fields()))
    return parser


def worker_config(args: argparse.Namespace | None = None, **overrides) -> WorkerConfig:
    """This worker's settings: defaults < PS_* environment < `args` (from add_arguments) < `overrides`.

    A bad or unknown setting raises ConfigError naming it.
    """
    allowed = _fields()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown worker option {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    # only the worker's own flags: the user's parser may have a --device or --batch-size of its own
    ns = argparse.Namespace(**{k: v for k, v in vars(args or argparse.Namespace()).items() if k in allowed})
    return from_args(WorkerConfig, ns, **overrides)


def client_options(cfg: WorkerConfig) -> dict:
    """The client's keyword arguments for `cfg` (wire dtype included where this build has it)."""
    opts = dict(worker=cfg.rank, request_timeout=cfg.request_timeout, server_timeout=cfg.server_timeout,
                heartbeat=cfg.heartbeat, curve_server=cfg.curve_server, curve_secret=cfg.curve_secret)
    if getattr(cfg, "wire_dtype", None) not in (None, "", "fp32"):
        opts["wire_dtype"] = cfg.wire_dtype
    return opts


def _make_client(addresses: list[str], **options) -> PSClient:
    """The one place a user's worker gets its client: one address, one PSClient; with shards (`--server`
    lists one address per shard, in shard order) a ShardedClient with the same verbs, one connection per shard.
    """
    if not addresses:
        raise ConfigError("--server names no address; give tcp://HOST:PORT (one per shard)")
    if len(addresses) > 1:
        from worker.sharded import ShardedClient
        return ShardedClient(addresses, client=PSClient, **options)
    return PSClient(addresses[0], **options)


def connect(cfg: WorkerConfig | None = None) -> PSClient:
    """A client for `cfg` (default: worker_config()), not yet registered. Close it (or use `with`)."""
    cfg = cfg or worker_config()
    return _make_client([a.strip() for a in cfg.server.split(",") if a.strip()], **client_options(cfg))
