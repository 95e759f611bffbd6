"""The PyTorch API (worker/api.py), the sampler (worker/sampler.py) and the numpy-only client promise."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import paramserver as ps
from common.config import ConfigError
from examples.cnn_api import SmallCNN, make_images
from examples.numpy_worker import D, init_params, make_data
from tests.conftest import ROOT
from worker.data import batches, shard_indices
from worker.sampler import ShardSampler

LR, N = 0.1, 2


# -- the sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["contiguous", "random", "hash"])
def test_sampler_gives_the_builtin_jobs_batches(strategy):
    """Through a DataLoader, each worker's batches are exactly worker.data.batches' (the built-in jobs'),
    epoch after epoch; the shards are disjoint and cover the data set."""
    n, bs, seed = 203, 8, 5
    data = TensorDataset(torch.arange(n))
    seen = []
    for rank in range(3):
        sampler = ShardSampler(data, rank=rank, num_workers=3, shard=strategy, seed=seed)
        loader = DataLoader(data, batch_size=bs, sampler=sampler, drop_last=True)
        got = [b[0].numpy() for _ in range(2) for b in loader]     # two epochs
        shard = shard_indices(n, 3, rank, strategy, seed)
        want = [idx for epoch, idx in batches(shard, bs, seed + 1000 * rank, epochs=2)]
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
        assert not np.array_equal(got[0], got[len(got) // 2])          # the second epoch is reshuffled
        seen.append(np.sort(np.fromiter(ShardSampler(n, rank, 3, strategy, seed), dtype=np.int64)))
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))
    s = ShardSampler(n, 1, 3, strategy, seed)
    s.set_epoch(1)
    assert np.array_equal(np.fromiter(s, dtype=np.int64), s.epoch_order(1))


def test_bad_options_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown worker option 'lr'"):
        ps.worker_config(lr=0.1)
    with pytest.raises(ConfigError, match="--rank 5"):
        ps.worker_config(rank=5, num_workers=2)


# -- sync through the API equals single-process training --------------------------------------

def _run_api_worker(model, data, address, rank, steps, accum, batch_size, out, options=None):
    try:
        with ps.DistributedOptimizer(model, server=address, rank=rank, num_workers=N, accum=accum, shard="hash",
                                     seed=3, **(options or {})) as opt:
            out[("client", rank)] = type(opt.client).__name__
            loader = DataLoader(data, batch_size=batch_size, sampler=opt.sampler(data), drop_last=True)
            for x, y in loader:                      # the user's loop, unchanged
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step(loss=loss)
                if opt.steps == steps:
                    break
            out[rank] = opt.steps
            inner = opt.client.inner if type(opt.client).__name__ == "OverlapClient" else opt.client
            # every push through shared memory (with shards: through each shard's own segment)
            out[("shm", rank)] = all(c.stats.get("shm_pushes", 0) == steps for c in getattr(inner, "clients", [inner]))
        # the server's answer to each push is counted, also when pushes go in the background (overlap)
        out[("answers", rank)] = opt.stats["applied"] + opt.stats["accumulated"]
    except BaseException as exc:   # surfaced by the test
        out[rank] = exc


@pytest.mark.parametrize("accum, shards, options, client", [
    (1, 1, {}, "ShmClient"), (3, 1, {}, "ShmClient"), (1, 2, {}, "ShardedClient"),
    (1, 1, {"shm": False}, "PSClient"), (1, 2, {"overlap": True}, "OverlapClient")])
def test_api_sync_equals_single_process_training(start_server, accum, shards, options, client):
    """Two workers training a CNN (no built-in job has one) through DistributedOptimizer in sync mode end
    at the θ of single-process SGD on the union of their batches (with --accum k: of their k micro-batches);
    also with θ split over 2 server shards (the API is given both addresses). The API's client is the worker
    loop's: shared memory by default, tcp with shm=False, pushes in the background with overlap=True."""
    steps, bs = 4, 8
    servers = [start_server(num_workers=N, mode="sync", optimizer="sgd", lr=LR, aggregate="mean", shard_index=i,
                            num_shards=shards) for i in range(shards)]
    srv = servers[0]
    address = ",".join(s.address for s in servers)
    x, y = make_images(320, seed=1)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    torch.manual_seed(0)
    model0 = SmallCNN()
    init = copy.deepcopy(model0.state_dict())
    out: dict = {}
    threads = [threading.Thread(target=_run_api_worker, daemon=True,
                                args=(copy.deepcopy(model0), data, address, r, steps, accum, bs, out, options))
               for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    via_shm = client != "PSClient"   # shared memory unless shm=False
    assert out == {0: steps, 1: steps, ("client", 0): client, ("client", 1): client, ("shm", 0): via_shm,
                   ("shm", 1): via_shm, ("answers", 0): steps, ("answers", 1): steps}, out
    assert all(s.server.store.version == steps for s in servers)
    assert all(isinstance(u[4], float) for u in srv.server.record.updates)   # step(loss=...) labels each push

    ref = SmallCNN()
    ref.load_state_dict(init)
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    orders = [ShardSampler(data, r, N, "hash", 3).epoch_order(0) for r in range(N)]
    for t in range(steps):
        idx = np.concatenate([o[(t * accum + k) * bs:(t * accum + k + 1) * bs] for o in orders for k in range(accum)])
        sgd.zero_grad()
        F.cross_entropy(ref(data.tensors[0][idx]), data.tensors[1][idx]).backward()
        sgd.step()
    if shards == 1:
        theta = srv.server.store.theta
    else:   # the shards' pieces joined back into whole tensors
        from common.shards import merge_states
        theta = merge_states([s.server.state_dict() for s in servers])["theta"]
    worst = max(float(np.abs(theta[n] - p.detach().numpy()).max()) for n, p in ref.named_parameters())
    assert worst <= 1e-5, f"max |theta_ps - theta_single_process| = {worst}"
    moved = max(float(np.abs(theta[n] - init[n].numpy()).max()) for n in init)
    assert moved > 1e-3                                           # it really trained


def test_leaves_on_ctrl_c_in_a_with_block(start_server):
    """A KeyboardInterrupt inside `with DistributedOptimizer(...)` says LEAVE: the server stops waiting at once."""
    srv = start_server(num_workers=1, mode="sync", optimizer="sgd", lr=LR, worker_timeout=300)
    model = torch.nn.Linear(3, 1)
    with pytest.raises(KeyboardInterrupt):
        with ps.DistributedOptimizer(model, server=srv.address) as opt:
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            raise KeyboardInterrupt
    assert opt.closed and srv.server.store.version == 1
    state = srv.server.workers[0]
    assert state.left, "the worker did not leave"


# -- numpy only -------------------------------------------------------------------------------

def _torch_blocked_env(tmp_path) -> dict:
    """An environment in which `import torch` fails."""
    fake = tmp_path / "blocker" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is blocked in this process')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocker"), ROOT]), OMP_NUM_THREADS="1")


def test_numpy_client_path_imports_no_torch(tmp_path):
    """The documented numpy-only names import and work where torch cannot be imported."""
    code = ("import paramserver as ps, sys\n"
            "from paramserver import PSClient, ShardSampler, connect, worker_config, add_arguments\n"
            "import worker.client, worker.connect, worker.sampler\n"
            "assert len(ShardSampler(100, 1, 4)) == 25\n"
            "with connect(worker_config(server='tcp://127.0.0.1:9')) as c: pass\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    ps.DistributedOptimizer\nexcept ImportError as e:\n    print('blocked:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_torch_blocked_env(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "blocked: torch is blocked" in r.stdout          # the blocker works: the PyTorch API needs torch


TORCH_WORKER = """
import sys
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import paramserver as ps
from examples.numpy_worker import D, init_params, make_data
address, steps, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y = make_data()
model = torch.nn.Linear(D, 1)
with torch.no_grad():
    for name, value in init_params(3).items():
        getattr(model, name).copy_(torch.from_numpy(value))
data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
with ps.DistributedOptimizer(model, server=address, rank=1, num_workers=2, shard="hash", seed=3) as opt:
    for xb, yb in DataLoader(data, batch_size=bs, sampler=opt.sampler(data), drop_last=True):
        opt.zero_grad()
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        opt.step(loss=loss)
        if opt.steps == steps:
            break
print("torch worker done", opt.steps)
"""


def test_numpy_worker_and_torch_worker_train_in_one_job(start_server, tmp_path):
    """examples/numpy_worker.py, in a process where importing torch fails, and a PyTorch worker on the API
    train one least-squares job in sync mode; θ equals single-process SGD on the union of their batches."""
    steps, bs = 10, 32
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=LR, aggregate="mean")
    numpy_proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "numpy_worker.py"), "--steps", str(steps), "--batch-size",
         str(bs), "--server", srv.address, "--rank", "0", "--num-workers", "2", "--shard", "hash", "--seed", "3"],
        env=_torch_blocked_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch_proc = subprocess.Popen([sys.executable, "-c", TORCH_WORKER, srv.address, str(steps), str(bs)],
                                  env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_np, _ = numpy_proc.communicate(timeout=120)
    out_torch, _ = torch_proc.communicate(timeout=120)
    assert numpy_proc.returncode == 0, out_np
    assert torch_proc.returncode == 0, out_torch
    assert "torch imported: False" in out_np and f"{steps} steps" in out_np
    assert srv.server.store.version == steps
    assert all(u[3] == 0 for u in srv.server.record.updates)

    x, y = make_data()
    ref = torch.nn.Linear(D, 1)
    with torch.no_grad():
        for name, value in init_params(3).items():
            getattr(ref, name).copy_(torch.from_numpy(value))
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    orders = [ShardSampler(len(x), r, 2, "hash", 3).epoch_order(0) for r in range(2)]
    for t in range(steps):
        idx = np.concatenate([o[t * bs:(t + 1) * bs] for o in orders])
        sgd.zero_grad()
        F.mse_loss(ref(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
        sgd.step()
    theta = srv.server.store.theta
    worst = max(float(np.abs(theta[n] - p.detach().numpy()).max()) for n, p in ref.named_parameters())
    assert worst <= 1e-5, f"max |theta_ps - theta_single_process| = {worst}"
    assert float(np.abs(theta["weight"] - init_params(3)["weight"]).max()) > 1e-2


def test_settings_from_flags_env_and_keywords(monkeypatch):
    """Defaults < PS_* environment < the user's argparse flags (ps.add_arguments) < keyword arguments; the
    user's own flags (here a --device the worker config would refuse) are left alone."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda:1")
    ps.add_arguments(parser)
    monkeypatch.setenv("PS_SERVER", "tcp://10.0.0.5:5555")
    monkeypatch.setenv("PS_RANK", "1")
    monkeypatch.setenv("PS_NUM_WORKERS", "4")
    cfg = ps.worker_config(parser.parse_args([]))
    assert (cfg.server, cfg.rank, cfg.num_workers, cfg.accum) == ("tcp://10.0.0.5:5555", 1, 4, 1)
    cfg = ps.worker_config(parser.parse_args(["--rank", "2", "--num-workers", "8"]))
    assert (cfg.rank, cfg.num_workers) == (2, 8)          # a flag on the command line beats the environment
    cfg = ps.worker_config(parser.parse_args(["--rank", "2", "--accum", "4", "--shard", "hash"]), rank=3)
    assert (cfg.server, cfg.rank, cfg.num_workers, cfg.accum, cfg.shard) == ("tcp://10.0.0.5:5555", 3, 4, 4, "hash")
    with pytest.raises(SystemExit):
        parser.parse_args(["--shard", "striped"])      # choices come from the worker's config


def test_auto_rank_replacement_beyond_num_workers_trains_on_a_shard(start_server):
    """PS_RANK=auto through the API, while the worker it replaces is still counted live: the server assigns
    an id >= --num-workers, and the API maps it to a rank the way the worker loop does (id mod N)."""
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=LR)
    data = TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    first, second = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    with ps.DistributedOptimizer(first, server=srv.address, rank=-1, num_workers=1) as live:
        assert live.rank == 0
        with ps.DistributedOptimizer(second, server=srv.address, rank=-1, num_workers=1) as replacement:
            assert replacement.client.worker >= 1           # the server's id: beyond --num-workers
            assert replacement.rank == 0
            loader = DataLoader(data, batch_size=4, sampler=replacement.sampler(data), drop_last=True)
            for xb, yb in loader:
                replacement.zero_grad()
                F.mse_loss(second(xb), yb).backward()
                replacement.step()
            assert replacement.steps == 3


def test_should_stop_when_the_server_ends_the_job(start_server):
    """With --max-gradients the server ends the job: should_stop turns true and later steps push nothing."""
    srv = start_server(num_workers=1, mode="sync", optimizer="sgd", lr=LR, max_gradients=3)
    model = torch.nn.Linear(3, 1)
    with ps.DistributedOptimizer(model, server=srv.address) as opt:
        for _ in range(6):
            opt.zero_grad()
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
        assert opt.should_stop and opt.steps == 3
    assert srv.server.policy.counters["applied"] == 3 and srv.server.policy.counters["received"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_goes_through_pinned_buffers():
    """On CUDA, theta and gradients are staged in pinned host buffers and arrive exactly."""
    from worker.transfer import ParamIO
    model = torch.nn.Linear(5, 3).cuda()
    io = ParamIO(model.named_parameters())
    assert io.cuda
    theta = {n: np.random.default_rng(i).standard_normal(p.shape).astype(np.float32)
             for i, (n, p) in enumerate(model.named_parameters())}
    for _ in range(2):   # the second load reuses the buffers after the first's copies are done
        io.load(theta)
        assert all(np.array_equal(p.detach().cpu().numpy(), theta[n]) for n, p in model.named_parameters())
        theta = {n: v + 1 for n, v in theta.items()}
    model(torch.ones(4, 5, device="cuda")).sum().backward()
    grads = io.grads({n: p.grad for n, p in model.named_parameters()})
    # the staging buffers (allocated at first use, then reused) are page-locked
    assert set(io._in) == set(io._out) == set(io.params) and all(
        t.is_pinned() for t in [*io._in.values(), *io._out.values()])
    assert all(np.array_equal(grads[n], p.grad.cpu().numpy()) for n, p in model.named_parameters())


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_api_with_a_16_bit_wire_loads_the_servers_theta_rounded(start_server, wire):
    """wire_dtype: θ travels as 16-bit values, taken as they came (raw) and widened into the model, which then
    holds exactly the server's float32 θ rounded to the wire dtype; the gradient goes up in 16 bits too."""
    from common.protocol import decode_wire, encode_wire
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=LR)
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3)
    x, y = torch.randn(16, 7), torch.randn(16, 3)
    # over the socket (through shared memory θ comes in float32 whatever the wire dtype, as in the worker loop)
    with ps.DistributedOptimizer(model, server=srv.address, rank=0, num_workers=1, wire_dtype=wire,
                                 shm=False) as opt:
        from common.protocol import Encoded
        loaded, load = [], opt.io.load
        opt.io.load = lambda tensors: (loaded.append(tensors), load(tensors))
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        theta = srv.server.store.theta
        assert opt.version == srv.server.store.version == 3
        for name, p in model.named_parameters():
            want = decode_wire(encode_wire(theta[name], wire))
            np.testing.assert_array_equal(p.detach().numpy(), want)
        assert not all(np.array_equal(p.detach().numpy(), theta[n]) for n, p in model.named_parameters())
        # the 16-bit values reached the model as they came (no float32 theta made per pull)
        assert len(loaded) == 3 and all(isinstance(t, Encoded) and t.wire == wire for m in loaded for t in m.values())


def test_api_default_shared_memory_with_a_16_bit_wire_loads_float32_theta(start_server):
    """The API's default client is the worker loop's: on the server's host θ comes through shared memory, in
    float32 whatever wire_dtype says (the bytes do not cross a network), so the model holds the server's θ exactly."""
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=LR)
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3)
    x, y = torch.randn(16, 7), torch.randn(16, 3)
    with ps.DistributedOptimizer(model, server=srv.address, rank=0, num_workers=1, wire_dtype="bf16") as opt:
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        assert type(opt.client).__name__ == "ShmClient" and opt.client.stats["shm_pulls"] >= 3
        assert opt.stats["applied"] == 3 and opt.version == srv.server.store.version == 3
        theta = srv.server.store.theta
        assert all(np.array_equal(p.detach().numpy(), theta[n]) for n, p in model.named_parameters())
