"""The multi-shard client: the same verbs as PSClient over K server shards that each hold part of theta.

theta is split by a `ShardPlan` (common/shards.py) computed from the model layout. There is one
PSClient (one connection) per shard, each driven by its own thread, so a pull or a push is sent
to every shard at once and the replies are collected as they come (the shards serve in parallel).
Each shard runs its own consistency policy; because every worker pushes to every shard, each
shard sees the same sequence of gradients and the shards stay in step:

* sync: each shard's barrier applies the sum of the same gradients, so K shards give the same
  theta as one server. With backup workers a shard applies the first N-b gradients *it* receives,
  which could differ between shards; so shard 0 decides: the worker pushes to shard 0 first and,
  when shard 0 dropped its gradient (a backup), tells the other shards to skip it (a PUSH with
  meta skip and no tensors) instead of sending it; the push that completed the step on shard 0
  carries the step's members (from shard 0's ACK) to the others. A follower shard applies a step when
  it holds exactly those members' gradients, or when every live worker has pushed or skipped (each
  worker's fate was decided by shard 0), never by its own first-N-b rule. Every shard then applies
  the same gradients, also when workers leave between steps. A pull goes to shard 0 first and asks
  the others for theta at the step shard 0 granted, so a worker never computes on parts of two steps.
* ssp / async: the bound and the apply-on-arrival rule hold on every shard separately.

Each shard gets the version and clock of its own last pull with a push (they are equal across
shards unless one was restarted from an older checkpoint). A pull returns the full theta by name;
its version is the smallest of the shards' versions and meta["shards"] lists each one's.

Usage::

    with ShardedClient(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"], worker=0) as ps:
        welcome = ps.register(init=model_params)
        params = ps.pull()
        ps.push(grads, version=params.version, clock=params.clock, loss=2.3)
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np

from common.protocol import Message, MsgType
from common.shards import ShardPlan, per_shard
from worker.client import PSClient

log = logging.getLogger("worker.sharded")


class ShardMapError(RuntimeError):
    """The shards do not form one job (they disagree on the consistency mode, for instance)."""


class ShardedClient:
    def __init__(self, servers: list[str], worker: int = -1, client: Callable[..., PSClient] = PSClient,
                 **client_kwargs):
        if len(servers) < 1:
            raise ValueError("ShardedClient needs at least one shard address")
        self.servers, self.worker = list(servers), worker
        # CurveZMQ: each shard may have its own key pair; curve_server is one public key file, or one per shard
        keys = per_shard(client_kwargs.pop("curve_server", ""), len(servers), "--curve-server")
        # one thread per shard, which also creates and closes that shard's client: a socket stays in one thread
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"ps-shard{k}") for k in range(len(servers))]
        self.clients: list[PSClient] = self._each(
            lambda k: client(self.servers[k], worker=worker, **client_kwargs,
                             **({"curve_server": keys[k]} if keys[k] else {})))
        self.plan: ShardPlan | None = None
        self.shard0_decides = False      # sync with backup workers: shard 0 picks the gradients of a step
        self._pulled = [(0, 0)] * len(servers)   # (version, clock) of each shard's last pull
        self.registered = False

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    def _each(self, fn: Callable[[int], object], shards=None) -> list:
        """Run fn(k) for every shard k in that shard's thread, all at once; results in shard order."""
        shards = range(self.num_shards) if shards is None else shards
        futures = [self._pools[k].submit(fn, k) for k in shards]
        return [f.result() for f in futures]

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "ShardedClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every shard's client and its thread. Safe to call twice."""
        if not self._pools:
            return
        self._each(lambda k: self.clients[k].close())
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._pools = []

    @property
    def server_timeout(self) -> float:
        return min(c.server_timeout for c in self.clients)

    @server_timeout.setter
    def server_timeout(self, value: float) -> None:
        for c in self.clients:
            c.server_timeout = value

    @property
    def request_timeout(self) -> float:
        return min(c.request_timeout for c in self.clients)

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        for c in self.clients:
            c.request_timeout = value

    @property
    def stats(self) -> dict:
        total: dict = {}
        for c in self.clients:
            for key, value in c.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    # -- the verbs ----------------------------------------------------------------------------

    def register(self, init: Mapping[str, np.ndarray], job: dict | None = None) -> Message:
        """Register with shard 0 (which may assign the worker id), then with the others under that id.
        Each shard gets its pieces of `init` and the shard map it must agree with."""
        init = {n: np.asarray(t) for n, t in init.items()}
        self.plan = ShardPlan.from_tensors(init, self.num_shards)
        parts = self.plan.split(init)

        def one(k: int) -> Message:
            self.clients[k].worker = self.worker
            return self.clients[k].register(parts[k], job, meta={"shard": {**self.plan.identity(k),
                                                                           "layout": self.plan.layout}})
        first = self._each(one, [0])[0]
        self.worker = first.worker
        welcomes = [first] + self._each(one, range(1, self.num_shards))
        for key in ("mode", "staleness", "aggregate", "backup_workers"):
            values = {str(w.meta.get(key)) for w in welcomes}
            if len(values) > 1:
                raise ShardMapError(f"the shards disagree on {key} ({', '.join(sorted(values))}): start every "
                                    "shard with the same server flags")
        if len({w.meta.get("mode") == "sync" and w.clock for w in welcomes}) > 1:
            log.warning("shards are at different sync steps %s (one resumed from an older checkpoint?); each "
                        "continues from its own", [w.clock for w in welcomes])
        self.shard0_decides = first.meta.get("mode") == "sync" and bool(first.meta.get("backup_workers"))
        self.registered = True
        return self._combine(MsgType.WELCOME, welcomes, first.meta)

    def pull(self, clock: int = 0, raw: bool = False) -> Message:
        """Full theta, from every shard at once (each may hold the pull at its barrier or bound). `raw`: 16-bit
        wire values stay `Encoded` (joined as they are, see ShardPlan.join)."""
        if self.shard0_decides and self.num_shards > 1:
            # shard 0 grants the step; the others are asked for theta at that same step (see follow_clock)
            first = self._each(lambda k: self.clients[k].pull(clock, raw=raw), [0])[0]
            if first.meta.get("stop"):
                return first
            replies = [first] + self._each(lambda k: self.clients[k].pull(first.clock, raw=raw),
                                           range(1, self.num_shards))
        else:
            replies = self._each(lambda k: self.clients[k].pull(clock, raw=raw))
        for r in replies:
            if r.meta.get("stop"):
                return r
        meta = {"wait_s": max(float(r.meta.get("wait_s", 0.0)) for r in replies),
                "min_clock": min(int(r.meta.get("min_clock", 0)) for r in replies)}
        return self._combine(MsgType.PARAMS, replies, meta)

    def _combine(self, mtype: MsgType, replies: list[Message], meta: dict) -> Message:
        self._pulled = [(r.version, r.clock) for r in replies]
        theta = self.plan.join([r.tensors for r in replies])
        return Message(mtype, worker=self.worker, seq=replies[0].seq, clock=replies[0].clock,
                       version=min(r.version for r in replies), tensors=theta,
                       meta={**meta, "shards": [{"version": r.version, "clock": r.clock} for r in replies]})

    def push(self, grads: Mapping[str, np.ndarray], version: int | None = None, clock: int | None = None,
             pulled: list[dict] | None = None, **meta) -> Message:
        """Send each shard its pieces of `grads`, with the version and clock of that shard's pull the gradient
        was computed on: `pulled` (the pull reply's meta["shards"]), by default the last pull (`version` and
        `clock` are those of the combined pull reply and are not needed). With async prefetch the last pull
        is already the next one, so worker/overlap.py passes `pulled`."""
        parts = self.plan.split(grads)
        tags = [(int(t["version"]), int(t["clock"])) for t in pulled] if pulled else list(self._pulled)
        if len(tags) != self.num_shards:
            raise ValueError(f"pulled names {len(tags)} shards; this client has {self.num_shards}")

        def one(k: int) -> Message:
            v, c = tags[k]
            return self.clients[k].push(parts[k], version=v, clock=c, **meta)

        def skip(k: int) -> Message:
            v, c = tags[k]
            return self.clients[k]._request(Message(MsgType.PUSH, clock=c, version=v, meta={"skip": True}))

        if self.shard0_decides and self.num_shards > 1:
            first = self._each(one, [0])[0]
            dropped = first.meta.get("status") == "dropped" and str(first.meta.get("reason", "")).startswith("backup")
            if first.meta.get("members") is not None:   # this push completed the step on shard 0: say with whom
                meta = {**meta, "members": first.meta["members"]}
            acks = [first] + self._each(skip if dropped else one, range(1, self.num_shards))
        else:
            acks = self._each(one)
        statuses = [a.meta.get("status", "") for a in acks]
        return Message(MsgType.ACK, worker=self.worker, seq=acks[0].seq, clock=acks[0].clock,
                       version=min(a.version for a in acks),
                       meta={"status": statuses[0] if len(set(statuses)) == 1 else ",".join(statuses),
                             "reason": acks[0].meta.get("reason", ""), "statuses": statuses,
                             "stop": any(a.meta.get("stop") for a in acks)})

    def leave(self, reason: str = "done") -> None:
        if self.registered:
            self._each(lambda k: self.clients[k].leave(reason))
            self.registered = False

    def status(self) -> list[dict]:
        """Every shard's status, in shard order."""
        return self._each(lambda k: self.clients[k].status())

    def shutdown(self) -> None:
        self._each(lambda k: self.clients[k].shutdown())
