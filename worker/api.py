"""Your own PyTorch training loop through the parameter server: an optimizer-like object.

`DistributedOptimizer(model)` connects (server and rank from flags or PS_SERVER / PS_RANK /
PS_NUM_WORKERS), registers the model's parameters (the first worker's become the server's θ),
and loads the θ the server hands out into the model. Each `step()` pushes the gradients in the
model's `.grad` and loads the next θ the server allows (the mode, sync / ssp / async, and the
update rule are the server's). With `accum=k` a push is the mean gradient of k consecutive
`step()` calls. With `local_steps=H > 1` the model is trained by an inner optimizer of its own
(`inner=`, your torch optimizer, or --inner-optimizer / --inner-lr) for H `step()` calls between
two pushes, and each push carries the pseudo-gradient θ_pulled − θ_local, which the server's
optimizer applies as the outer step (DiLoCo, local SGD; worker/local.py). θ and gradients move through `worker.transfer.ParamIO` (pinned host buffers and
non-blocking copies for a CUDA model, 16-bit narrowing on the device with --wire-dtype) and the
client is the worker loop's (`worker.connect.make_client`: shared memory with a server on this
host, shards, --overlap). The worker leaves the job on `close()`, at the end of a `with` block, on
Ctrl-C, on SIGTERM and at interpreter exit.

Usage::

    opt = DistributedOptimizer(model)            # import paramserver as ps; ps.DistributedOptimizer
    loader = DataLoader(data, batch_size=32, sampler=opt.sampler(data), drop_last=True)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.close()

    opt = DistributedOptimizer(model, inner=torch.optim.AdamW(model.parameters(), lr=3e-4), local_steps=50)
"""
from __future__ import annotations

import argparse
import atexit
import logging
import signal
import sys
import threading
from typing import Callable

import numpy as np
import torch

from common.config import ConfigError, WorkerConfig
from common.protocol import Message
from worker.client import ServerError, ServerUnavailable
from worker.connect import make_client, register, worker_config
from worker.local import LocalSteps
from worker.overlap import OverlapClient
from worker.sampler import ShardSampler
from worker.transfer import ParamIO

log = logging.getLogger("worker.api")

LEAVE_TIMEOUT = 5.0   # seconds close() waits for the server to acknowledge LEAVE


class DistributedOptimizer:
    """An optimizer-like object that trains `model` through the parameter server.

    Construct it after the model is built (and moved to its device): it connects, registers, and
    loads the server's θ (in sync mode it waits there until all --num-workers workers have
    registered). Then the usual loop: `zero_grad()`, backward, `step()`. Settings are the worker's
    (see `worker.connect.worker_config`): `server`, `rank`, `num_workers`, `shard`, `seed`,
    `accum`, timeouts, CurveZMQ keys, `wire_dtype`, `shm`, `overlap`, given as keyword arguments,
    as an argparse namespace (`args`, after `add_arguments(parser)`), or through PS_SERVER /
    PS_RANK / PS_NUM_WORKERS. `client`, when given, is used instead of one built from the settings
    (it has PSClient's verbs, its `pull` taking `raw`) and is left open by `close()`.

    `step()` averages the gradients of `accum` consecutive calls (each call adds the model's
    current `.grad`; zero them between calls as usual), pushes the mean with the version and
    clock of the θ it was computed on, and loads the next θ. `should_stop` turns True when the
    server ends the job (its --max-gradients budget); later steps do nothing. The learning rate
    and the update rule are the server's (--optimizer, --lr); buffers (e.g. BatchNorm statistics)
    stay local to each worker: with local_steps=1 (the default) your own optimizer is not used at
    all. With `local_steps=H > 1`, `inner` (a torch optimizer over the model's parameters; default:
    --inner-optimizer at --inner-lr) steps the model at every `step()`, and every H-th call pushes
    θ_pulled − θ_local and loads the server's new θ; `close()` pushes a shorter last round. The
    inner optimizer's state is kept across rounds.
    """

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace | None = None, *, client=None,
                 inner: torch.optim.Optimizer | None = None, **options):
        self.cfg: WorkerConfig = worker_config(args, **options)
        self.model = model
        if inner is not None and self.cfg.local_steps == 1:
            raise ConfigError("inner= is the optimizer of local steps: with local_steps=1 the server's --optimizer "
                              "updates θ and yours would never step; pass local_steps=H > 1 (or drop inner=)")
        if self.cfg.local_steps > 1 and self.cfg.accum > 1:
            raise ConfigError(f"local_steps={self.cfg.local_steps} with accum={self.cfg.accum}: the inner optimizer "
                              "steps at every step(); accumulate gradients yourself (call step() every k "
                              "backward passes), or use accum with local_steps=1")
        try:
            self.io = ParamIO(model, self.cfg.wire_dtype, compress=self.cfg.compress)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.client = client if client is not None else make_client(self.cfg)
        self._own_client = client is None
        self.closed = False
        self.should_stop = False
        self.steps = 0                 # pushes made
        self.stats = {"applied": 0, "accumulated": 0, "dropped": 0}
        self._tallied: Message | None = None   # overlap: the last settled answer counted in stats
        self._micro = 0
        self._acc: dict[str, torch.Tensor | None] | None = None
        self._acc_buf: dict[str, torch.Tensor] = {}   # accum > 1: the running sums, allocated once
        self._acc_seen: set[str] = set()               # the parameters with a gradient in this cycle
        self._losses: list[float] = []
        self._params = None            # the PARAMS reply whose θ the model holds
        self.local: LocalSteps | None = None   # local_steps > 1: the inner optimizer and θ_pulled
        if self.cfg.local_steps > 1:
            self.local = LocalSteps(self.io.params, self.cfg.inner_optimizer, self.cfg.inner_lr,
                                    self.cfg.inner_weight_decay, inner=inner)
        self._sigterm_installed = False
        atexit.register(self._at_exit)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)   # so SIGTERM leaves the job too
            self._sigterm_installed = True
        try:
            # PS_RANK=auto: the server's id mapped to a rank the one way the worker loop maps it too
            welcome, self.cfg = register(self.client, self.cfg, init=self.io.numpy_params(),
                                         job={"local_steps": self.cfg.local_steps})   # every worker the same H
            self.rank = self.cfg.rank
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
        if self.local is not None:
            self.local.step()
            if self.local.steps >= self.cfg.local_steps:
                self._push(self.local.delta())
            return loss
        self._accumulate()
        self._micro += 1
        if self._micro < self.cfg.accum:
            return loss
        grads = self._acc
        if self.cfg.accum > 1:
            for g in grads.values():
                if g is not None:
                    g.div_(self.cfg.accum)
        self._micro, self._acc = 0, None
        self._push(grads)
        return loss

    def _push(self, grads, pull: bool = True) -> None:
        """Push `grads` (by name: gradients, or Δ with local steps) with the θ's version and clock, then load
        the next θ (`pull`; or stop when the server says so)."""
        meta = {"loss": float(np.mean(self._losses))} if self._losses else {}
        ack = self.client.push(self.io.grads(grads), version=self._params.version, clock=self._params.clock, **meta)
        self._losses = []
        self.steps += 1
        self._tally(ack)
        if ack.meta.get("stop"):
            self._stop("the server's gradient budget is spent")
        elif pull:
            self._pull()
            self._tally()

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
        if self.local is not None and self.local.steps and not self.should_stop and reason == "done":
            try:
                self._push(self.local.delta(), pull=False)   # the last, shorter round
            except (ServerError, ServerUnavailable) as exc:
                log.warning("could not push the last round: %s", exc)
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
            self._tally()
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

    def _tally(self, ack: Message | None = None) -> None:
        """Count the server's answers to this worker's pushes in `stats`. With overlap=True a push returns
        "sent" at once; its answer is settled later (by the next pull, push or the goodbye) into the client's
        `last_ack`, and counted here once it is there."""
        answers = [ack] if ack is not None and ack.meta.get("status") != "sent" else []
        if isinstance(self.client, OverlapClient) and self.client.last_ack is not self._tallied:
            self._tallied = self.client.last_ack
            answers.append(self._tallied)
        for answer in answers:
            status = answer.meta.get("status", "").split(",")[0]   # θ over shards: shard 0's answer ("applied,accumulated")
            if status in self.stats:
                self.stats[status] += 1

    def _pull(self) -> None:
        reply = self.client.pull(raw=True)   # 16-bit wire values as they came: load() widens them into the model
        if reply.meta.get("stop"):
            self._stop(reply.meta.get("reason", "the server ended the job"))
            return
        self.io.load(reply.tensors)
        self._params = reply
        if self.local is not None:
            self.local.begin()

    def _stop(self, why: str) -> None:
        if not self.should_stop:
            log.info("worker %d: the server says stop (%s)", self.rank, why)
        self.should_stop = True

    def __repr__(self) -> str:
        return (f"DistributedOptimizer(worker {getattr(self, 'rank', '?')}/{self.num_workers}, mode "
                f"{getattr(self, 'mode', '?')}, {self.steps} pushes, version {self.version}, accum {self.cfg.accum})")


def _exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)   # unwinds: `with` blocks and atexit leave the job
