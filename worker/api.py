"""Your own PyTorch training loop through the parameter server: an optimizer-like object.

`DistributedOptimizer(model)` connects (server and rank from flags or PS_SERVER / PS_RANK /
PS_NUM_WORKERS), registers the model's parameters (the first worker's become the server's θ),
and loads the θ the server hands out into the model. Each `step()` pushes the gradients in the
model's `.grad` and loads the next θ the server allows (the mode, sync / ssp / async, and the
update rule are the server's). With `accum=k` a push is the mean gradient of k consecutive
`step()` calls. A CUDA model's θ and gradients go through pinned host buffers with
non-blocking copies. The worker leaves the job on `close()`, at the end of a `with` block, on
Ctrl-C, on SIGTERM and at interpreter exit.

Usage::

    opt = DistributedOptimizer(model)            # import paramserver as ps; ps.DistributedOptimizer
    loader = DataLoader(data, batch_size=32, sampler=opt.sampler(data), drop_last=True)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.close()
"""
from __future__ import annotations

import argparse
import atexit
import logging
import signal
import sys
import threading
from typing import Callable, Iterable

import numpy as np
import torch

from common.config import ConfigError, WorkerConfig
from worker.client import ServerError, ServerUnavailable, pulls_raw
from worker.connect import connect, worker_config
from worker.sampler import ShardSampler
from worker.transfer import _host_view

log = logging.getLogger("worker.api")

LEAVE_TIMEOUT = 5.0   # seconds close() waits for the server to acknowledge LEAVE


class ParamIO:
    """Moves θ (numpy, by name) into a model's parameters and gradients out, by name.

    On CPU it copies straight from the received frames and hands out views of the gradients. On
    CUDA it stages through pinned host buffers: θ is copied host -> device without blocking (the
    next load waits for the last one to finish before reusing its buffer), gradients device ->
    host without blocking, then one synchronize.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]):
        self.params = dict(named_params)
        if not self.params:
            raise ValueError("the model has no parameters to train")
        for name, p in self.params.items():
            if p.dtype in (torch.bfloat16,) or p.is_complex():
                raise ValueError(f"parameter {name!r} is {p.dtype}: keep parameters in float32/float16/float64 "
                                 "(use torch.autocast for mixed precision)")
        self.devices = sorted({p.device for p in self.params.values() if p.is_cuda}, key=str)
        self.cuda = bool(self.devices)
        if self.cuda:
            self.theta_host = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in self.params.items()}
            self.grad_host = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in self.params.items()}
            self._loaded: list = []   # CUDA events: the host -> device copies of the last load

    def numpy_params(self) -> dict[str, np.ndarray]:
        """A copy of the parameters as numpy arrays (what REGISTER sends)."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}

    @torch.no_grad()
    def load(self, tensors) -> None:
        """Copy θ (numpy arrays by name, possibly read-only views of received frames) into the parameters."""
        missing = set(self.params) - set(tensors)
        if missing:
            raise KeyError(f"the server's θ has no {sorted(missing)}: is the server running another model?")
        # (16-bit wire values come as they are, `Encoded`, and are widened by the copy: no float32 θ per step)
        if not self.cuda:
            for n, p in self.params.items():
                p.copy_(_host_view(tensors[n]))
            return
        for event in self._loaded:   # the pinned buffers may still be read by the last load's copies
            event.synchronize()
        for n, p in self.params.items():
            host = self.theta_host[n]
            host.copy_(_host_view(tensors[n]))
            p.copy_(host, non_blocking=p.is_cuda)
        self._loaded = []
        for device in self.devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._loaded.append(event)

    @torch.no_grad()
    def grads(self, grads: dict[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
        """Gradients by name as numpy arrays (zeros for a parameter without a gradient)."""
        if not self.cuda:
            return {n: (g.detach() if g is not None else torch.zeros_like(p)).cpu().contiguous().numpy()
                    for (n, p), g in ((item, grads.get(item[0])) for item in self.params.items())}
        out = {}
        for n, p in self.params.items():
            host, g = self.grad_host[n], grads.get(n)
            if g is None:
                host.zero_()
            else:
                host.copy_(g.detach(), non_blocking=g.is_cuda)
            out[n] = host.numpy()
        for device in self.devices:
            torch.cuda.synchronize(device)
        return out


class DistributedOptimizer:
    """An optimizer-like object that trains `model` through the parameter server.

    Construct it after the model is built (and moved to its device): it connects, registers, and
    loads the server's θ (in sync mode it waits there until all --num-workers workers have
    registered). Then the usual loop: `zero_grad()`, backward, `step()`. Settings are the worker's
    (see `worker.connect.worker_config`): `server`, `rank`, `num_workers`, `shard`, `seed`,
    `accum`, timeouts, CurveZMQ keys, given as keyword arguments, as an argparse namespace
    (`args`, after `add_arguments(parser)`), or through PS_SERVER / PS_RANK / PS_NUM_WORKERS.

    `step()` averages the gradients of `accum` consecutive calls (each call adds the model's
    current `.grad`; zero them between calls as usual), pushes the mean with the version and
    clock of the θ it was computed on, and loads the next θ. `should_stop` turns True when the
    server ends the job (its --max-gradients budget); later steps do nothing. The learning rate
    and the update rule are the server's (--optimizer, --lr); buffers (e.g. BatchNorm statistics)
    stay local to each worker.
    """

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace | None = None, *, client=None,
                 **options):
        self.cfg: WorkerConfig = worker_config(args, **options)
        self.model = model
        try:
            self.io = ParamIO(model.named_parameters())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.client = client if client is not None else connect(self.cfg)
        self._pull_raw = pulls_raw(self.client)
        self._own_client = client is None
        self.closed = False
        self.should_stop = False
        self.steps = 0                 # pushes made
        self.stats = {"applied": 0, "accumulated": 0, "dropped": 0}
        self._micro = 0
        self._acc: dict[str, torch.Tensor | None] | None = None
        self._acc_buf: dict[str, torch.Tensor] = {}   # accum > 1: the running sums, allocated once
        self._acc_seen: set[str] = set()               # the parameters with a gradient in this cycle
        self._losses: list[float] = []
        self._params = None            # the PARAMS reply whose θ the model holds
        self._sigterm_installed = False
        atexit.register(self._at_exit)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)   # so SIGTERM leaves the job too
            self._sigterm_installed = True
        try:
            welcome = self.client.register(init=self.io.numpy_params(), job={})
            self.rank = int(welcome.worker)
            self.mode = welcome.meta.get("mode", "")
            self._pull()
        except BaseException:
            self._abort("could not start")
            raise

    # -- the optimizer interface --------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return self.cfg.num_workers

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None, loss=None):
        """Take the current gradients; every `accum`-th call push their mean and load the next θ.

        `closure` (as torch.optim) recomputes and returns the loss; `loss` (a number or a scalar
        tensor) only labels the push in the server's metrics. Returns the closure's loss.
        """
        if self.closed:
            raise RuntimeError("step() after close(): this worker has left the job")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.should_stop:
            return loss
        if loss is not None:
            self._losses.append(float(loss.detach().item() if torch.is_tensor(loss) else loss))
        self._accumulate()
        self._micro += 1
        if self._micro < self.cfg.accum:
            return loss
        grads = self._acc
        if self.cfg.accum > 1:
            for g in grads.values():
                if g is not None:
                    g.div_(self.cfg.accum)
        meta = {"loss": float(np.mean(self._losses))} if self._losses else {}
        ack = self.client.push(self.io.grads(grads), version=self._params.version, clock=self._params.clock, **meta)
        self._micro, self._acc, self._losses = 0, None, []
        self.steps += 1
        status = ack.meta.get("status", "")
        if status in self.stats:
            self.stats[status] += 1
        if ack.meta.get("stop"):
            self._stop("the server's gradient budget is spent")
        else:
            self._pull()
        return loss

    def sampler(self, data, shard: str | None = None, seed: int | None = None, shuffle: bool = True) -> ShardSampler:
        """This worker's shard of `data` (a data set or its size) as a DataLoader sampler (see ShardSampler)."""
        return ShardSampler(data, self.rank, self.num_workers, shard or self.cfg.shard,
                            self.cfg.seed if seed is None else seed, shuffle)

    @property
    def version(self) -> int:
        """The version of the θ the model holds."""
        return self._params.version if self._params is not None else -1

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, reason: str = "done") -> None:
        """Leave the job (the server stops waiting for this worker) and close the client. Safe twice."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._at_exit)
        if self._sigterm_installed and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # LEAVE is a courtesy (the server would declare this worker dead after --worker-timeout anyway):
        # never wait the full --server-timeout for it
        self.client.server_timeout = min(self.client.server_timeout, LEAVE_TIMEOUT)
        try:
            self.client.leave(reason)
        except (ServerError, ServerUnavailable) as exc:
            log.warning("could not say goodbye to the server: %s", exc)
        finally:
            if self._own_client:
                self.client.close()

    def __enter__(self) -> "DistributedOptimizer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("done")
        else:
            self._abort("interrupted" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else
                        f"error: {exc_type.__name__}")

    def _abort(self, reason: str) -> None:
        """Leave on the way out of an error or interrupt; never raises."""
        try:
            self.close(reason)
        except Exception as exc:
            log.warning("could not say goodbye to the server: %s", exc)

    def _at_exit(self) -> None:
        self._abort("exit")

    # -- internals ----------------------------------------------------------------------------

    def _accumulate(self) -> None:
        grads = {n: p.grad for n, p in self.io.params.items()}
        if self.cfg.accum == 1:
            self._acc = grads
            return
        if self._micro == 0:   # a new cycle: the sums start again (in the same buffers)
            self._acc_seen = set()
        for n, g in grads.items():
            if g is None:
                continue
            if n in self._acc_seen:
                self._acc_buf[n].add_(g)
                continue
            buf = self._acc_buf.get(n)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
                buf = self._acc_buf[n] = torch.empty_like(g)
            buf.copy_(g.detach())
            self._acc_seen.add(n)
        self._acc = {n: (self._acc_buf[n] if n in self._acc_seen else None) for n in grads}

    def _pull(self) -> None:
        # 16-bit wire values as they came (a client that takes `raw`): load() widens them into the model
        reply = self.client.pull(raw=True) if self._pull_raw else self.client.pull()
        if reply.meta.get("stop"):
            self._stop(reply.meta.get("reason", "the server ended the job"))
            return
        self.io.load(reply.tensors)
        self._params = reply

    def _stop(self, why: str) -> None:
        if not self.should_stop:
            log.info("worker %d: the server says stop (%s)", self.rank, why)
        self.should_stop = True

    def __repr__(self) -> str:
        return (f"DistributedOptimizer(worker {getattr(self, 'rank', '?')}/{self.num_workers}, mode "
                f"{getattr(self, 'mode', '?')}, {self.steps} pushes, version {self.version}, accum {self.cfg.accum})")


def _exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)   # unwinds: `with` blocks and atexit leave the job
