"""worker/overlap.py: overlapped sync gives the same theta as sync without overlap; async prefetch works and
sends each gradient as it was when pushed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import WorkerConfig
from common.protocol import Encoded, Message, MsgType, decode_wire, encode_wire
from tests.conftest import worker_process


def _run(start_server, tmp_path, name, mode, overlap, shards=1, steps=6, **server):
    srvs = [start_server(num_workers=2, mode=mode, optimizer="adam", lr=0.01, shard_index=i, num_shards=shards,
                         **server) for i in range(shards)]
    out = tmp_path / name
    cfgs = [WorkerConfig(server=",".join(s.address for s in srvs), rank=r, num_workers=2, job="mlp", batch_size=8,
                         steps=steps, eval_every=0, log_every=0, shard="hash", seed=3, threads=1, overlap=overlap,
                         out=str(out)) for r in range(2)]
    procs = [worker_process(c) for c in cfgs]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    steps_rows = [json.loads((out / f"worker{r}.json").read_text())["steps"] for r in range(2)]
    return srvs, steps_rows


@pytest.mark.parametrize("shards", [1, 2])
def test_overlapped_sync_equals_sync(start_server, tmp_path, shards):
    plain, _ = _run(start_server, tmp_path, "plain", "sync", False, shards)
    over, rows = _run(start_server, tmp_path, "over", "sync", True, shards)
    assert all(row[8] == "sent" for row in rows[0])          # the overlapped run did not wait for its ACKs
    for a, b in zip(plain, over):
        assert a.server.store.version == b.server.store.version == 6
        assert all(np.array_equal(a.server.store.theta[n], b.server.store.theta[n]) for n in a.server.store.theta)


@pytest.mark.parametrize("shards", [1, 2])
def test_async_prefetch_applies_every_push(start_server, tmp_path, shards):
    srvs, rows = _run(start_server, tmp_path, "async", "async", True, shards=shards, steps=10, divergence_every=1)
    for srv in srvs:
        server = srv.server
        assert server.store.version == 20 and server.policy.counters["applied"] == 20
        # a prefetched theta never holds the worker's own last gradient: every push is at least 1 version stale
        # (each shard is told the version the gradient was computed on, not that of the prefetch made since)
        for worker in (0, 1):
            mine = [u for u in server.record.updates if u[2] == worker][1:]
            assert mine and min(u[3] for u in mine) >= 1
        # and its divergence is measured against the theta it was computed on (the server keeps samples of the last pulls)
        assert all(u[5] is not None and u[5] > 0 for u in server.record.updates if u[3] >= 1)


class _SlowInner:
    """A stand-in client whose push reads the gradient only after a pause (as ZeroMQ's I/O thread may, since
    gradients are sent zero-copy), recording what it read."""

    def __init__(self):
        self.worker, self.stats, self.server_timeout = 0, {}, 1.0
        self.sent: list[dict] = []

    def register(self, init=None, job=None):
        return Message(MsgType.WELCOME, meta={"mode": "async"})

    def pull(self, clock=0, raw=False):
        return Message(MsgType.PARAMS, version=len(self.sent))

    def push(self, grads, version, clock, **meta):
        import time
        time.sleep(0.1)
        self.sent.append({n: decode_wire(g) if isinstance(g, Encoded) else np.array(g, copy=True)
                          for n, g in grads.items()})
        return Message(MsgType.ACK, meta={"status": "applied"})

    def close(self):
        pass


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_async_push_sends_the_gradient_it_was_given(wire):
    """With async prefetch the next pull returns before the last push is sent, and the worker then zeroes and
    refills its .grad buffers (train.py pushes views of them): the push must send the gradient as it was."""
    from worker.overlap import OverlapClient
    inner = _SlowInner()
    bits = np.empty(4, np.uint16)      # ParamIO's reused 16-bit gradient buffer
    ps = OverlapClient(inner)
    ps.register()
    grad = {"w": np.full(4, 1.0, np.float32)}
    for step in range(3):
        params = ps.pull()
        ps.push({"w": grad["w"] if wire == "fp32" else encode_wire(grad["w"], wire, out=bits)},
                version=params.version, clock=step)
        ps.pull()                      # prefetched: answered without waiting for the push
        grad["w"][:] = 0.0             # zero_grad, then backward writes the next gradient into the same buffer
        grad["w"][:] = step + 2.0
        bits[:] = 0
    ps._settle()
    ps.close()
    assert [s["w"].tolist() for s in inner.sent] == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
