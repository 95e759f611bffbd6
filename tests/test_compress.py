"""--compress int8 (common/int8.py, worker/compress.py), the bytes counted (client stats, server status) and
--link-mbps (worker/link.py): the format's error bound, error feedback, the wire, the server's refusals,
shards, shared memory, a converging run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zmq

from common.config import JobConfig, WorkerConfig
from common.int8 import BLOCK, Int8Blocks, n_blocks, quantize
from common.protocol import Message, MsgType, ProtocolError, decode, encode, frames_bytes
from common.shards import ShardPlan
from tests.conftest import run_worker_thread
from worker.client import PSClient
from worker.compress import ErrorFeedback
from worker.link import Link
from worker.transfer import ParamIO


def _blockwise(x: np.ndarray, phase: int = 0) -> list[slice]:
    edges = [0] + list(range(BLOCK - phase if phase else BLOCK, x.size, BLOCK)) + [x.size]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _gradient_like(n: int, seed: int) -> np.ndarray:
    """Heavy-tailed values with zero blocks and an outlier, as gradients are."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, n) * 10.0 ** rng.uniform(-6, 1)).astype(np.float32)
    x[: min(n, BLOCK)] = 0.0
    if n > 3 * BLOCK:
        x[2 * BLOCK + 5] = 1e4
    return x


@pytest.mark.parametrize("n", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 10 * BLOCK + 333])
def test_round_trip_error_is_at_most_half_a_step_of_each_block(n):
    x = _gradient_like(n, n)
    b = quantize(x)
    assert b.q.dtype == np.int8 and b.scales.dtype == np.float32 and b.scales.size == n_blocks(n)
    back = b.to_float32()
    for i, blk in enumerate(_blockwise(x)):
        s = float(b.scales[i])
        assert s == float(np.abs(x[blk]).max())                       # the scale is the block's absmax
        assert np.abs(b.q[blk]).max() <= 127
        err = np.abs(x[blk].astype(np.float64) - back[blk])
        assert err.max() <= s / 254 * (1 + 1e-6) + 1e-30, (i, err.max(), s / 254)
    assert not back[:min(n, BLOCK)].any()                              # a zero block stays zero


def test_a_piece_keeps_the_whole_tensors_blocks():
    """A shard's piece of a tensor (any start) dequantizes to exactly the whole tensor's values there."""
    x = _gradient_like(5 * BLOCK + 17, 1)
    whole = quantize(x)
    full = whole.to_float32()
    for a, b in [(0, 100), (3, 4000), (BLOCK, 2 * BLOCK), (BLOCK - 1, 3 * BLOCK + 2), (4000, x.size)]:
        piece = whole.piece(a, b)
        assert piece.phase == a % BLOCK and piece.scales.size == n_blocks(b - a, a % BLOCK)
        np.testing.assert_array_equal(piece.to_float32(), full[a:b])
        back = decode(encode(Message(MsgType.PUSH, tensors={"p": piece}))).tensors["p"]
        np.testing.assert_array_equal(back, full[a:b])


def test_error_feedback_keeps_the_running_sums_together():
    """Σ sent tracks Σ true: their difference is the last residual, within one rounding step of a block,
    however many pushes; without error feedback the difference grows."""
    ef = ErrorFeedback()
    rng = np.random.default_rng(0)
    n = 3 * BLOCK + 100
    true_sum = np.zeros(n, np.float64)
    sent_sum = np.zeros(n, np.float64)
    plain_sum = np.zeros(n, np.float64)
    gaps = []
    bias = rng.normal(0, 1e-3, n).astype(np.float32)     # a small steady part that rounding alone would lose
    for step in range(300):
        g = (bias + rng.normal(0, 1.0, n)).astype(np.float32)
        q, s = ef.compress("w", torch.from_numpy(g))
        sent = Int8Blocks(q.numpy(), s.numpy()).to_float32()
        true_sum += g
        sent_sum += sent
        plain_sum += quantize(g).to_float32()
        gap = np.abs(true_sum - sent_sum)
        np.testing.assert_allclose(true_sum - sent_sum, ef.residual["w"].numpy(), atol=1e-3)
        per_value_bound = np.repeat(s.numpy() / 254, BLOCK)[:n]      # this push's rounding step, per value
        assert (gap <= per_value_bound * 1.001 + 1e-3).all(), step
        gaps.append(gap.max())
    assert max(gaps[-50:]) <= 1.5 * max(gaps[:50])                    # bounded, not growing
    assert np.abs(true_sum - plain_sum).max() > 5 * max(gaps)        # without feedback the error accumulates


def test_error_feedback_allocates_once():
    ef = ErrorFeedback()
    g = torch.randn(5000)
    for _ in range(5):
        ef.compress("w", g)
    assert ef.allocations == 2      # the residual (with its q and scales), the scratch buffer


def _gpt_io(**kw) -> ParamIO:
    job_cfg = JobConfig()          # the default GPT
    from worker.models import GPT
    torch.manual_seed(0)
    model = GPT(job_cfg.n_layer, job_cfg.n_head, job_cfg.n_embd, job_cfg.context)
    x = torch.randint(0, 256, (4, job_cfg.context))
    torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1)).backward()
    return ParamIO(model, **kw)


def test_an_int8_push_of_the_default_gpt_is_about_half_of_bf16(capsys):
    """The bytes of the whole PUSH message (header and every frame). 8 bits plus any scale can never reach
    exactly 2x fewer than bf16's 16: at 1024 values per block the payload is 1.004 bytes per value, and the
    small tensors (layer norms, biases: one scale for 64 values) and the header bring the default GPT to
    ~1.97x; fp32 is ~3.9x."""
    sizes = {}
    for name, kw in {"fp32": {}, "bf16": {"wire": "bf16"}, "int8": {"compress": "int8"}}.items():
        grads = _gpt_io(**kw).grads()
        sizes[name] = frames_bytes(encode(Message(MsgType.PUSH, worker=0, seq=1, clock=3, version=3,
                                                  tensors=grads, meta={"loss": 2.5})))
    with capsys.disabled():
        print(f"\ndefault GPT push bytes: {sizes}; bf16/int8 {sizes['bf16'] / sizes['int8']:.3f}, "
              f"fp32/int8 {sizes['fp32'] / sizes['int8']:.3f}")
    assert sizes["bf16"] / sizes["int8"] >= 1.95
    assert sizes["fp32"] / sizes["int8"] >= 3.9


def _register(srv, theta: dict) -> PSClient:
    client = PSClient(srv.address, worker=0)
    client.register(init=theta)
    return client


def _frames_with(theta_shape, mutate) -> list:
    x = _gradient_like(math.prod(theta_shape), 3).reshape(theta_shape)
    frames = encode(Message(MsgType.PUSH, worker=0, seq=99, tensors={"w": quantize(x)}))
    return mutate([bytes(f) if not isinstance(f, bytes) else f for f in frames])


def _respec(frames, **changes):
    import msgpack
    header = msgpack.unpackb(frames[0])
    header["ts"][0] = [*header["ts"][0][:4], changes.get("phase", header["ts"][0][4])]
    return [msgpack.packb(header)] + frames[1:]


@pytest.mark.parametrize("what, mutate, needle", [
    ("one scale too few", lambda f: [f[0], f[1][:-4], f[2]], "int8 scales"),
    ("values cut short", lambda f: [f[0], f[1], f[2][:-1]], "int8 values"),
    ("a NaN scale", lambda f: [f[0], np.float32([np.nan]).tobytes() + f[1][4:], f[2]], "nan"),
    ("an Inf scale", lambda f: [f[0], f[1][:4] + np.float32([np.inf]).tobytes() + f[1][8:], f[2]], "inf"),
    ("a negative scale", lambda f: [f[0], np.float32([-1]).tobytes() + f[1][4:], f[2]], "-1.0"),
    ("a phase beyond a block", lambda f: _respec(f, phase=BLOCK), "phase"),
    ("the scales frame missing", lambda f: [f[0], f[2]], "frame"),
])
def test_a_malformed_int8_push_is_refused_and_theta_is_unchanged(start_server, what, mutate, needle):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    shape = (3, BLOCK)
    client = _register(srv, {"w": np.ones(shape, np.float32)})
    frames = _frames_with(shape, mutate)
    with pytest.raises(ProtocolError, match=needle):
        decode(frames)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10000), "no answer"
        reply = decode(sock.recv_multipart())
    finally:
        sock.close()
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "malformed", (what, reply.meta)
    assert needle.lower() in reply.meta["error"].lower()
    assert srv.server.store.version == 0 and (srv.server.store.theta["w"] == 1).all()
    # the server keeps serving: a good int8 push is applied
    good = quantize(np.full(shape, 0.5, np.float32))
    ack = client.push({"w": good}, version=0, clock=0)
    assert ack.meta["status"] == "applied"
    np.testing.assert_allclose(srv.server.store.theta["w"], 1 - 0.1 * 0.5, rtol=1e-6)
    client.close()


def test_an_int8_push_applies_exactly_the_dequantized_values(start_server):
    """The server applies D(C(g)), the values the worker's error feedback assumed, bit for bit (sgd, lr 1)."""
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=1.0, aggregate="sum")
    theta = {"w": np.zeros((7, 700), np.float32), "b": np.zeros(5, np.float32)}
    client = _register(srv, theta)
    g = {n: quantize(_gradient_like(t.size, 5).reshape(t.shape)) for n, t in theta.items()}
    client.push(g, version=0, clock=0)
    for n in theta:
        np.testing.assert_array_equal(srv.server.store.theta[n], -g[n].to_float32())
    stats, status = client.stats, srv.server.status()
    client.close()
    assert stats["bytes_pushed"] == status["bytes"]["pushed"] > sum(b.nbytes for b in g.values())
    assert stats["bytes_pulled"] == status["bytes"]["pulled"] > 0   # the WELCOME with theta
    assert stats["bytes_sent"] == status["bytes"]["received"]


def _run_linear(start_server, compress: str, shm: bool, steps: int = 40):
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05, aggregate="mean", shm=shm)
    results, threads = {}, []
    for rank in range(2):
        cfg = WorkerConfig(server=srv.address, rank=rank, num_workers=2, job="linear", batch_size=16, steps=steps,
                           eval_every=0, log_every=0, heartbeat=0.5, log_level="warning", compress=compress,
                           shm=shm, request_timeout=30.0)   # (no resends under load: the byte counts must agree)
        threads.append(run_worker_thread(cfg, results))
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    return srv.server, results


@pytest.mark.parametrize("shm", [False, True])
def test_a_sync_run_with_int8_converges_and_the_bytes_add_up(start_server, shm):
    server, results = _run_linear(start_server, "int8", shm)
    losses = [u[4] for u in server.record.updates]
    assert server.store.version == 40
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:3]), losses
    bytes_ = server.status()["bytes"]
    stats = [results[r]["client"] for r in range(2)]
    assert all(s["bytes_pushed"] > 0 and s["bytes_pulled"] > 0 for s in stats)
    assert sum(s["bytes_pushed"] for s in stats) == bytes_["pushed"]
    assert sum(s["bytes_pulled"] for s in stats) == bytes_["pulled"]
    if shm:   # the gradients went through shared memory, dequantized (float32); only headers crossed the socket
        assert sum(s["shm_bytes_pushed"] for s in stats) == bytes_["shm_pushed"] > 0
    else:
        assert bytes_["shm_pushed"] == 0


def test_link_pacing_charges_at_least_the_bytes_over_the_rate(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    link = Link(8.0)    # 8 Mb/s: 1 MB per second
    client = PSClient(srv.address, worker=0, link=link)
    theta = {"w": np.zeros(50_000, np.float32)}
    client.register(init=theta)
    for _ in range(3):
        p = client.pull()
        client.push({"w": np.ones(50_000, np.float32)}, version=p.version, clock=p.clock)
    stats = dict(client.stats)
    client.close()
    moved = stats["bytes_sent"] + stats["bytes_received"]
    assert moved > 6 * 200_000
    assert stats["link_s"] >= moved * 8 / 8e6 * (1 - 1e-9)
    assert link.seconds(1_000_000) == 1.0


def test_link_mbps_turns_shared_memory_off_and_shares_one_link_over_shards():
    from worker.connect import make_client
    cfg = WorkerConfig(server="tcp://127.0.0.1:1,tcp://127.0.0.1:2", rank=0, num_workers=1, link_mbps=100)
    client = make_client(cfg)
    try:
        assert all(type(c) is PSClient for c in client.clients)
        assert client.clients[0].link is client.clients[1].link and client.clients[0].link.mbps == 100
    finally:
        client.close()


def test_shards_get_int8_pieces_that_add_up_to_the_whole(start_server):
    """Two shards, sgd lr 1: the joined theta after one int8 push is exactly -D(C(g)) of the whole tensors,
    whatever offsets the plan cut them at."""
    layout = {"a": np.zeros((5, 1000), np.float32), "b": np.zeros(3000, np.float32), "c": np.zeros(10, np.float32)}
    shards = [start_server(num_workers=1, mode="async", optimizer="sgd", lr=1.0, aggregate="sum", shard_index=i,
                           num_shards=2) for i in range(2)]
    from worker.sharded import ShardedClient
    client = ShardedClient([s.address for s in shards], worker=0)
    try:
        client.register(init=layout)
        assert any(p.start % BLOCK for p in client.plan.pieces if not p.whole)   # a piece that starts mid-block
        g = {n: quantize(_gradient_like(t.size, 9).reshape(t.shape)) for n, t in layout.items()}
        client.pull()
        client.push(g)
        got = ShardPlan.from_tensors(layout, 2).join([s.server.store.theta for s in shards])
    finally:
        client.close()
    for n in layout:
        np.testing.assert_array_equal(got[n], -g[n].to_float32())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_int8_pushes_equal_the_cpus():
    """The device path (residual and quantization on the GPU, int8 values and scales to pinned buffers) sends
    the CPU path's values, push after push (not yet run on a GPU)."""
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 3))
    gpu = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 3)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    io_cpu, io_gpu = ParamIO(cpu, compress="int8"), ParamIO(gpu, compress="int8")
    for step in range(3):
        g = {n: torch.randn_like(p) for n, p in cpu.named_parameters()}
        a = io_cpu.grads(g)
        b = io_gpu.grads({n: t.cuda() for n, t in g.items()})
        for n in a:
            np.testing.assert_array_equal(b[n].scales, a[n].scales)            # absmax: exact anywhere
            assert np.abs(a[n].q.astype(int) - b[n].q).max() <= 1                # (a tie may round apart)
