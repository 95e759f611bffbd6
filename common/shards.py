"""How theta is split over K server shards: a deterministic, size-balanced partition plan.

Both sides compute the plan from the model layout alone ({name: [dtype, shape]}), so every
worker and every shard agree on it without talking: a tensor larger than `piece_elems` is cut
into near-equal flat ranges (so one embedding table never lands on one shard), then pieces are
dealt largest first to the least-loaded shard (ties: lower index). Piece keys:

    "name"              the whole tensor, in its own shape
    "name[start:stop]"  elements start..stop-1 of the flattened tensor, as a 1-d array

`plan_hash` names the plan (layout + K + algorithm version); a shard refuses a worker whose
shard count, index or plan hash differs from its own (`check_identity`).

Usage::

    plan = ShardPlan.build(layout, num_shards=2)
    parts = plan.split(grads)              # [{piece key: array} for shard 0, for shard 1]
    theta = plan.join(parts)               # {name: full array}
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from common.int8 import Int8Blocks
from common.protocol import Encoded, decode_wire

PLAN_VERSION = 1
#: the largest piece, in elements (4 MiB of float32, as BytePS's default partition)
MAX_PIECE_ELEMS = 1 << 20
#: no piece smaller than this is cut off a tensor (a tiny model stays whole-tensor)
MIN_PIECE_ELEMS = 1 << 10


@dataclass(frozen=True)
class Piece:
    key: str
    name: str
    start: int      # flat element range [start, stop) of tensor `name`
    stop: int
    whole: bool     # the piece is the whole tensor (sent in its own shape)
    shard: int


class ShardPlan:
    def __init__(self, layout: dict[str, list], num_shards: int, pieces: list[Piece]):
        self.layout, self.num_shards, self.pieces = layout, num_shards, pieces
        blob = json.dumps([PLAN_VERSION, num_shards, sorted((n, d, list(s)) for n, (d, s) in layout.items()),
                           [[p.key, p.shard] for p in pieces]], separators=(",", ":"))
        self.hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.by_shard = [[p for p in pieces if p.shard == k] for k in range(num_shards)]

    @classmethod
    def build(cls, layout: dict[str, list], num_shards: int) -> "ShardPlan":
        if num_shards < 1:
            raise ValueError("the number of shards must be at least 1")
        layout = {n: [str(d), [int(x) for x in s]] for n, (d, s) in layout.items()}
        total = sum(math.prod(s) for _, s in layout.values())
        piece_elems = min(MAX_PIECE_ELEMS, max(MIN_PIECE_ELEMS, math.ceil(total / (4 * num_shards))))
        cut = []   # (bytes, key, name, start, stop, whole)
        for name in sorted(layout):
            dtype, shape = layout[name]
            n = math.prod(shape)
            itemsize = np.dtype(dtype).itemsize
            parts = max(1, math.ceil(n / piece_elems))
            if parts == 1:
                cut.append((n * itemsize, name, name, 0, n, True))
                continue
            bounds = [round(i * n / parts) for i in range(parts + 1)]
            for a, b in zip(bounds, bounds[1:]):
                cut.append(((b - a) * itemsize, f"{name}[{a}:{b}]", name, a, b, False))
        load = [0] * num_shards
        pieces = []
        for nbytes, key, name, a, b, whole in sorted(cut, key=lambda c: (-c[0], c[1])):
            k = min(range(num_shards), key=lambda i: (load[i], i))
            load[k] += nbytes
            pieces.append(Piece(key, name, a, b, whole, k))
        pieces.sort(key=lambda p: (p.name, p.start))
        return cls(layout, num_shards, pieces)

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], num_shards: int) -> "ShardPlan":
        return cls.build({n: [t.dtype.name, list(t.shape)] for n, t in tensors.items()}, num_shards)

    def shard_bytes(self) -> list[int]:
        return [sum((p.stop - p.start) * np.dtype(self.layout[p.name][0]).itemsize for p in ps)
                for ps in self.by_shard]

    def split(self, tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Full tensors by name -> one {piece key: array} per shard (views where possible)."""
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_shards)]
        for p in self.pieces:
            out[p.shard][p.key] = _piece(tensors[p.name], p)
        return out

    def shard_part(self, tensors: dict[str, np.ndarray], shard: int) -> dict[str, np.ndarray]:
        return {p.key: _piece(tensors[p.name], p) for p in self.by_shard[shard]}

    def join(self, parts: list[dict[str, np.ndarray]], out: dict[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
        """One {piece key: array} per shard -> full tensors by name (written into `out` if given). A tensor
        whose pieces all came as 16-bit wire values (`Encoded`, a raw pull) is joined as such, without
        widening; pieces of one tensor in different encodings are widened to float32."""
        wires: dict[str, set] = {}
        for p in self.pieces:
            src = parts[p.shard][p.key]
            wires.setdefault(p.name, set()).add(src.wire if isinstance(src, Encoded) else None)
        if out is None:
            out = {}
            for n, (d, s) in self.layout.items():
                (wire,) = wires[n] if len(wires[n]) == 1 else (None,)
                out[n] = (Encoded(np.empty(s, np.dtype("<u2" if wire == "bf16" else "<f2")), wire) if wire
                          else np.empty(s, dtype=np.dtype(d)))
        for p in self.pieces:
            src, dst = parts[p.shard][p.key], out[p.name]
            if isinstance(dst, Encoded):
                dst, src = dst.bits, src.bits
            elif isinstance(src, Encoded):
                src = decode_wire(src)
            if p.whole:
                dst[...] = src
            else:
                dst.reshape(-1)[p.start:p.stop] = src.reshape(-1)
        return out

    def identity(self, shard: int) -> dict:
        """What a worker tells shard `shard` in REGISTER (checked by `check_identity`)."""
        return {"index": shard, "count": self.num_shards, "plan": self.hash}


def _piece(t, p):
    """The part of tensor `t` that piece `p` covers: a view (of the 16-bit values of an `Encoded` one; of an
    int8 one's values and the scales of their blocks, which stay the whole tensor's: see Int8Blocks.piece)."""
    if p.whole:
        return t
    if isinstance(t, Int8Blocks):
        return t.piece(p.start, p.stop)
    if isinstance(t, Encoded):
        return Encoded(t.bits.reshape(-1)[p.start:p.stop], t.wire)
    return np.asarray(t).reshape(-1)[p.start:p.stop]


def check_identity(index: int, count: int, plan_hash: str, offered: dict | None) -> str:
    """'' when a registering worker's shard map fits this server (shard `index` of `count`, holding
    the pieces of plan `plan_hash`, '' before the first worker), else one line naming what differs."""
    if not offered:
        if count > 1:
            return (f"this server is shard {index} of {count} (--num-shards {count}); give the worker all {count} "
                    "shard addresses, comma-separated in shard order (--server A0,A1,...)")
        return ""
    theirs_count, theirs_index = offered.get("count"), offered.get("index")
    if theirs_count != count:
        return (f"shard count differs: the worker has {theirs_count} shard address(es) but this server was started "
                f"with --num-shards {count}; give --server exactly {count} addresses")
    if theirs_index != index:
        return (f"shard index differs: the worker's address list puts this server at position {theirs_index} but "
                f"it is --shard-index {index}; list the addresses in shard order")
    if plan_hash and offered.get("plan") != plan_hash:
        return (f"plan hash differs: the worker's partition plan is {offered.get('plan')!r} but this shard holds "
                f"pieces of plan {plan_hash!r} (another model, or another paramserver version); start the worker "
                "with the same job flags as the others")
    return ""


def parse_addresses(server: str) -> list[str]:
    """'tcp://a:1,tcp://b:2' -> ['tcp://a:1', 'tcp://b:2'] (one address per shard, in shard order)."""
    addresses = [a.strip() for a in server.split(",")]
    if not all(addresses):
        raise ValueError(f"--server {server!r} has an empty address; give one address per shard, comma-separated")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--server {server!r} names the same address twice; each shard has its own address")
    return addresses


def per_shard(value: str, count: int, flag: str) -> list[str]:
    """A flag that takes one value for all `count` shards or one per shard, comma-separated in shard order
    ('k.key' or 'k0.key,k1.key'): the value for each shard. ValueError naming `flag` when the counts differ."""
    values = [v.strip() for v in value.split(",")] if value else [""]
    if len(values) == 1:
        return values * count
    if len(values) != count or not all(values):
        raise ValueError(f"{flag} {value!r} names {len(values)} files for {count} shard address(es); give one per "
                         "shard, comma-separated in the order of the addresses, or one for every shard")
    return values


def merge_states(states: list[dict]) -> dict:
    """The checkpoints of shards 0..K-1 (load_checkpoint dicts, in shard order) -> one unsharded checkpoint
    with full theta and optimizer state by name, loadable by `paramserver server --resume` and evaluate.
    Refuses a set that is not one job's shards. version/step are the smallest of the shards'; the shards'
    own are kept in "shard_versions" (equal when the job stopped cleanly in sync mode)."""
    k = len(states)
    layouts = [s.get("shard_layout") or {} for s in states]
    for i, s in enumerate(states):
        shard = s.get("shard", {})
        if (shard.get("index"), shard.get("count")) != (i, k):
            raise ValueError(f"checkpoint {i} holds shard {shard.get('index')} of {shard.get('count')}; give the "
                             f"{k} shard checkpoints in shard order")
        if shard.get("plan") != states[0]["shard"].get("plan") or layouts[i] != layouts[0]:
            raise ValueError(f"checkpoint {i} is from another job (partition plan differs from shard 0's)")
    plan = ShardPlan.build(layouts[0], k)
    if plan.hash != states[0]["shard"].get("plan"):
        raise ValueError("the shard checkpoints were written with another partition plan version")
    theta = plan.join([s["theta"] for s in states])
    slots = set.intersection(*[{slot for per in s.get("optimizer_state", {}).values() for slot in per}
                               for s in states]) if states else set()
    optimizer_state: dict = {n: {} for n in theta}
    for slot in sorted(slots):
        parts = [{key: per[slot] for key, per in s["optimizer_state"].items()} for s in states]
        if all(len(p) == len(plan.by_shard[i]) for i, p in enumerate(parts)):
            for n, arr in plan.join(parts).items():
                optimizer_state[n][slot] = arr
    merged = dict(states[0])
    merged.update(theta=theta, optimizer_state={n: s for n, s in optimizer_state.items() if s},
                  version=min(int(s["version"]) for s in states),
                  opt_steps=min(int(s.get("opt_steps", s["version"])) for s in states),
                  step=min(int(s.get("step", 0)) for s in states),
                  shard={"index": 0, "count": 1, "plan": ""}, shard_layout={},
                  shard_versions=[int(s["version"]) for s in states])
    if isinstance(merged.get("config"), dict):
        merged["config"] = {**merged["config"], "shard_index": 0, "num_shards": 1}
    return merged
