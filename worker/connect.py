"""Connecting a worker: who it is (server, rank, shards) from flags or PS_* variables, its client, its rank.

This module needs no torch (numpy, pyzmq, msgpack only): a numpy worker uses it as is, and the
worker loop (`worker/train.py`), `--entry` jobs and the PyTorch API (`worker/api.py`) build on it.
It owns the one client factory (`make_client`: tcp or shared memory, one server or shards, with or
without overlap) and the one place a WELCOME's worker id becomes a rank (`register`). Settings
resolve as everywhere in paramserver: defaults < environment (PS_SERVER, PS_RANK, PS_NUM_WORKERS) <
flags < keyword arguments.

Usage::

    cfg = worker_config()                   # or worker_config(parser.parse_args()) after add_arguments(parser)
    with connect(cfg) as client:            # PSClient verbs: register / pull / push / leave
        welcome, cfg = register(client, cfg, init={"w": w0})   # cfg.rank: the rank to train as
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from common.config import ConfigError, WorkerConfig, add_arguments as _add_fields, from_args
from common.protocol import Message
from common.shards import parse_addresses
from worker.client import PSClient
from worker.link import Link
from worker.overlap import OverlapClient
from worker.sharded import ShardedClient
from worker.shmclient import ShmClient

log = logging.getLogger("worker.connect")

#: the WorkerConfig fields a user's own worker takes
API_FIELDS = ("server", "rank", "num_workers", "shard", "seed", "accum", "request_timeout",
              "server_timeout", "heartbeat", "curve_server", "curve_secret", "wire_dtype", "shm", "overlap",
              "local_steps", "inner_optimizer", "inner_lr", "inner_weight_decay", "compress", "link_mbps")
#: seconds a worker with --rank -1 waits for WELCOME before it sends REGISTER again
AUTO_RANK_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the worker flags (--server, --rank, --num-workers, --shard, --seed, --accum, ...) to your parser."""
    _add_fields(parser, WorkerConfig, skip=tuple(f.name for f in dataclasses.fields(WorkerConfig)
                                                 if f.name not in API_FIELDS))
    return parser


def worker_config(args: argparse.Namespace | None = None, **overrides) -> WorkerConfig:
    """This worker's settings: defaults < PS_* environment < `args` (from add_arguments) < `overrides`.

    A bad or unknown setting raises ConfigError naming it.
    """
    unknown = sorted(set(overrides) - set(API_FIELDS))
    if unknown:
        raise ConfigError(f"unknown worker option {', '.join(map(repr, unknown))}; choose from {', '.join(API_FIELDS)}")
    # only the worker's own flags: the user's parser may have a --device or --batch-size of its own
    ns = argparse.Namespace(**{k: v for k, v in vars(args or argparse.Namespace()).items() if k in API_FIELDS})
    return from_args(WorkerConfig, ns, **overrides)


def make_client(cfg: WorkerConfig):
    """The one client factory: a client for `cfg`, not yet registered. Close it (or use `with`).

    One address: one connection; a comma-separated list (one address per shard, in shard order): a
    ShardedClient with the same verbs, one connection per shard. With --shm (the default) each connection
    is a ShmClient (shared memory with a server on this host, tcp otherwise); with --overlap the whole is
    wrapped in an OverlapClient (pushes in the background, async prefetch). --link-mbps (an emulated link,
    worker/link.py: one for the worker, shared by its shard connections) stands for a worker on another
    machine, so it turns shared memory off: every byte then crosses a socket and is paced.
    """
    addresses = parse_addresses(cfg.server)
    if not addresses:
        raise ConfigError("--server names no address; give tcp://HOST:PORT (one per shard)")
    kwargs = dict(worker=cfg.rank, request_timeout=cfg.request_timeout, server_timeout=cfg.server_timeout,
                  heartbeat=cfg.heartbeat, drop=cfg.fault_drop, duplicate=cfg.fault_dup,
                  fault_seed=cfg.seed * 1000 + cfg.rank, curve_server=cfg.curve_server, curve_secret=cfg.curve_secret,
                  wire_dtype=cfg.wire_dtype, link=Link(cfg.link_mbps) if cfg.link_mbps > 0 else None)
    one = ShmClient if cfg.shm and not cfg.link_mbps else PSClient
    client = ShardedClient(addresses, client=one, **kwargs) if len(addresses) > 1 else one(addresses[0], **kwargs)
    return OverlapClient(client) if cfg.overlap else client


def connect(cfg: WorkerConfig | None = None):
    """A client for `cfg` (default: worker_config()), not yet registered (see make_client)."""
    return make_client(cfg or worker_config())


def register(client, cfg: WorkerConfig, init: dict, job: dict | None = None) -> tuple[Message, WorkerConfig]:
    """REGISTER (the first worker's parameters initialise θ); returns WELCOME and `cfg` with the rank to train as.

    With --rank -1 (PS_RANK=auto) the server assigns the worker id, and this is the one place it becomes
    a rank: id mod --num-workers, so that a replacement that joined while the worker it replaces was still
    counted live (its id is then N or more) trains on a shard instead of failing. A resend would be a second
    registration under another id, so the first answer is awaited longer: ZeroMQ delivers the request once
    the server is up, and a resend is needed only if the server lost it (a restart).
    """
    if cfg.rank >= 0:
        return client.register(init=init, job=job or {}), cfg
    saved, client.request_timeout = client.request_timeout, max(client.request_timeout, AUTO_RANK_TIMEOUT)
    try:
        welcome = client.register(init=init, job=job or {})
    finally:
        client.request_timeout = saved
    rank = int(welcome.worker) % cfg.num_workers
    if rank != welcome.worker:
        log.warning("the server assigned worker id %d, beyond --num-workers %d: training on shard %d",
                    welcome.worker, cfg.num_workers, rank)
    log.info("rank assigned by the server: %d", rank)
    return welcome, dataclasses.replace(cfg, rank=rank)
