"""The worker loop: register, then pull theta, compute a gradient on the next batch, push it.

With --local-steps H > 1 each round pulls theta, takes H steps of the worker's own optimizer and pushes
the pseudo-gradient theta_pulled - theta_local instead (`_train_local`, worker/local.py).

Each step records where its time went (computing, waiting at the barrier or staleness bound,
communicating), the loss, and on rank 0 the held-out loss every `eval_every` steps. The worker
leaves when it has made `steps` pushes or its shard is used up (`epochs`), so the others never
wait for it.

Usage::

    metrics = run_worker(WorkerConfig(server="tcp://127.0.0.1:5555", rank=0, num_workers=2, job="mlp"))
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import threading
import time

import numpy as np
import torch

from common.config import JobConfig, WorkerConfig, subset
from worker.client import PSClient
from worker.connect import make_client, register
from worker.data import batches, shard_indices
from worker.local import LocalSteps
from worker.models import build_job, pick_device
from worker.transfer import ParamIO

log = logging.getLogger("worker.train")


#: one row of a worker's (or DDP rank's) "steps" and "evals" series
STEP_FIELDS = ["time_s", "clock", "version", "loss", "compute_s", "wait_s", "comm_s", "sleep_s", "status"]
#: a PS worker's rows go on with comm_s split into its parts: the pull (its wait excluded) and the push
PS_STEP_FIELDS = STEP_FIELDS + ["pull_s", "push_s"]
EVAL_FIELDS = ["time_s", "step", "version", "eval_loss"]


def straggler_rng(cfg: WorkerConfig) -> random.Random:
    """The generator that decides which steps a straggler slows (the same draws for a PS worker and a DDP rank)."""
    return random.Random(cfg.seed * 7919 + cfg.rank)


def batch_stream(cfg: WorkerConfig, n_samples: int):
    """(shard, iterator of (epoch, indices)): exactly the batches worker `cfg.rank` trains on."""
    shard = shard_indices(n_samples, cfg.num_workers, cfg.rank, cfg.shard, cfg.seed)
    return shard, batches(shard, cfg.batch_size, cfg.seed + 1000 * cfg.rank, cfg.epochs)


def run_worker(cfg: WorkerConfig, client: PSClient | None = None) -> dict:
    """Train until done; returns (and writes to cfg.out) this worker's metrics."""
    device = pick_device(cfg.device)
    if device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    job = build_job(subset(cfg, JobConfig), device)
    own = client is None
    client = client or make_client(cfg)
    io = ParamIO(job.model, cfg.wire_dtype, compress=cfg.compress)   # reused buffers, no model-size allocation per step
    m = {"rank": cfg.rank, "device": device, "threads": torch.get_num_threads(), "data": job.description,
         "steps": [], "step_fields": PS_STEP_FIELDS, "evals": [], "eval_fields": EVAL_FIELDS}
    t_start = time.time()
    m["exit"] = "done"
    gate = None
    try:
        auto = cfg.rank < 0   # --rank -1 / PS_RANK=auto: the server assigns the id, register() maps it to a rank
        welcome, cfg = register(client, cfg, init=job.params_numpy(), job=_job_meta(cfg))
        if auto:
            m["rank"], m["worker_id"] = cfg.rank, welcome.worker
        shard, stream = batch_stream(cfg, job.n_samples)
        m["shard_size"] = int(len(shard))
        log.info("worker %d registered (mode=%s, version %d); %s; shard %d samples", cfg.rank,
                 welcome.meta.get("mode"), welcome.version, job.description, len(shard))
        gate = _GateReporter(cfg, client)
        if cfg.local_steps > 1:
            m["local_steps"] = cfg.local_steps
            _train_local(cfg, job, client, io, welcome, stream, gate, m, t_start)
        else:
            _train(cfg, job, client, io, welcome, stream, gate, m, t_start)
        client.leave("done")
    except (KeyboardInterrupt, SystemExit):
        m["exit"] = "interrupted"
        if cfg.out:   # first, in case saying goodbye takes longer than whoever stops us waits
            m["wall_s"], m["t0_epoch"] = round(time.time() - t_start, 3), t_start
            write_metrics(m, cfg)
        client.server_timeout = min(client.server_timeout, 3.0)
        try:
            client.leave("interrupted")
        except Exception:
            pass
        raise
    except BaseException as exc:
        m["exit"] = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:   # every way out (done, SIGINT, SIGTERM, an error) leaves this worker's metrics behind
        if gate is not None:
            gate.stop()
        m["client"] = dict(client.stats)
        if own:
            client.close()
        m["wall_s"] = round(time.time() - t_start, 3)
        m["t0_epoch"] = t_start
        if cfg.out:
            write_metrics(m, cfg)
    return m


def _train(cfg: WorkerConfig, job, client, io: ParamIO, welcome, stream, gate, m: dict, t_start: float) -> None:
    """The loop, one step per iteration: pull θ, forward/backward on this worker's micro-batches, push the
    gradient; each step's timings go into m["steps"], rank 0's held-out evaluations into m["evals"]."""
    slow_rng = straggler_rng(cfg)
    if cfg.rank == 0 and cfg.eval_every:
        job.load_params(welcome.tensors)
        m["evals"].append([0.0, 0, welcome.version, job.eval_loss(cfg.eval_batches, cfg.batch_size)])
    for step in range(cfg.steps):
        micro = [item[1] for item in itertools.islice(stream, cfg.accum)]
        if len(micro) < cfg.accum:
            log.info("worker %d: shard used up after %d epoch(s)", cfg.rank, cfg.epochs)
            break
        t0 = time.perf_counter()
        params, gated = _pull(cfg, client, gate, m, first=step == 0)
        t1 = time.perf_counter()
        if params is None:
            break
        io.load(params.tensors)
        job.model.zero_grad(set_to_none=False)   # backward accumulates into the same .grad buffers
        loss_sum = 0.0
        for idx in micro:
            x, y = job.batch(idx)
            loss = job.loss(x, y) / cfg.accum
            loss.backward()
            loss_sum += loss.item()
        grads = io.grads()   # (on cuda: waits for the copies to the pinned buffers)
        t2 = time.perf_counter()
        slept = 0.0
        if cfg.slowdown > 1.0 and slow_rng.random() < cfg.slowdown_prob:
            # straggler: as if this worker's hardware were `slowdown` times slower for this step
            slept = (cfg.slowdown - 1.0) * (t2 - t1)
            time.sleep(slept)
        t3 = time.perf_counter()
        ack = client.push(grads, version=params.version, clock=params.clock, loss=loss_sum)
        t4 = time.perf_counter()
        wait = float(params.meta.get("wait_s", 0.0)) - gated
        pull_s = max(0.0, (t1 - t0) - wait - gated)
        m["steps"].append([round(time.time() - t_start, 4), params.clock, params.version, loss_sum,
                           round(t2 - t1, 5), round(wait, 5), round(pull_s + (t4 - t3), 5), round(slept, 5),
                           ack.meta.get("status", ""), round(pull_s, 5), round(t4 - t3, 5)])
        if cfg.rank == 0 and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            # the model still holds the theta this step computed on
            m["evals"].append([round(time.time() - t_start, 4), step, params.version,
                               job.eval_loss(cfg.eval_batches, cfg.batch_size)])
        if ack.meta.get("stop"):
            break
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log.info("worker %d step %d/%d clock %d version %d loss %.4f", cfg.rank, step + 1, cfg.steps,
                     params.clock, params.version, loss_sum)


def _pull(cfg: WorkerConfig, client, gate, m: dict, first: bool):
    """(θ as it came, seconds the first pull waited at the start gate), or (None, gated) when the server says
    stop. 16-bit θ stays as it came: io.load widens it into the model. The start gate's wait is not a wait the
    policy imposes: the first pull's is recorded apart, as m["start_gate_s"]."""
    params = client.pull(raw=True)
    gated = 0.0
    if first:
        gate.stop()
        gated = float(params.meta.get("wait_s", 0.0))
        m["start_gate_s"] = round(gated, 5)
    if params.meta.get("stop"):
        log.info("worker %d: server says stop (%s)", cfg.rank, params.meta.get("reason"))
        return None, gated
    return params, gated


def _train_local(cfg: WorkerConfig, job, client, io: ParamIO, welcome, stream, gate, m: dict, t_start: float) -> None:
    """Rounds of --local-steps H: pull θ, H inner optimizer steps on this worker's batches, push Δ = θ_pulled −
    θ_local. `--steps` counts inner steps (batches of --accum micro-batches), so runs with different H train on
    the same samples; the last round may be shorter. One m["steps"] row per round (its loss: the mean over the
    round; compute_s: the H steps). Rank 0 evaluates the server's θ as pulled, at the first round and then at
    the first round after each further `eval_every` inner steps."""
    slow_rng = straggler_rng(cfg)
    local = LocalSteps(job.model, cfg.inner_optimizer, cfg.inner_lr, cfg.inner_weight_decay)
    done, evaluated, exhausted = 0, -1, False
    while done < cfg.steps and not exhausted:
        t0 = time.perf_counter()
        params, gated = _pull(cfg, client, gate, m, first=local.rounds == 0)
        t1 = time.perf_counter()
        if params is None:
            break
        io.load(params.tensors)
        local.begin()
        if cfg.rank == 0 and cfg.eval_every and done // cfg.eval_every > evaluated:
            evaluated = done // cfg.eval_every
            m["evals"].append([round(time.time() - t_start, 4), done, params.version,
                               job.eval_loss(cfg.eval_batches, cfg.batch_size)])
        t1c = time.perf_counter()
        loss_sum = 0.0
        for _ in range(min(cfg.local_steps, cfg.steps - done)):
            micro = [item[1] for item in itertools.islice(stream, cfg.accum)]
            if len(micro) < cfg.accum:
                log.info("worker %d: shard used up after %d epoch(s)", cfg.rank, cfg.epochs)
                exhausted = True
                break
            job.model.zero_grad(set_to_none=False)
            for idx in micro:
                x, y = job.batch(idx)
                loss = job.loss(x, y) / cfg.accum
                loss.backward()
                loss_sum += loss.item()
            local.step()
        if local.steps == 0:
            break
        grads = io.grads(local.delta())
        t2 = time.perf_counter()
        slept = 0.0
        if cfg.slowdown > 1.0 and slow_rng.random() < cfg.slowdown_prob:
            slept = (cfg.slowdown - 1.0) * (t2 - t1c)
            time.sleep(slept)
        t3 = time.perf_counter()
        ack = client.push(grads, version=params.version, clock=params.clock, loss=loss_sum / local.steps)
        t4 = time.perf_counter()
        done += local.steps
        wait = float(params.meta.get("wait_s", 0.0)) - gated
        pull_s = max(0.0, (t1 - t0) - wait - gated)
        m["steps"].append([round(time.time() - t_start, 4), params.clock, params.version, loss_sum / local.steps,
                           round(t2 - t1c, 5), round(wait, 5), round(pull_s + (t4 - t3), 5), round(slept, 5),
                           ack.meta.get("status", ""), round(pull_s, 5), round(t4 - t3, 5)])
        if ack.meta.get("stop"):
            break
        if cfg.log_every and local.rounds % cfg.log_every == 0:
            log.info("worker %d round %d (%d/%d steps) clock %d version %d loss %.4f", cfg.rank, local.rounds, done,
                     cfg.steps, params.clock, params.version, loss_sum / local.steps)
    m["inner_steps"] = done


def write_metrics(m: dict, cfg: WorkerConfig) -> None:
    """Write workerN.json atomically (a signal during the write leaves the previous file or none)."""
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, f"worker{m.get('worker_id', cfg.rank)}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(m, f)
    os.replace(path + ".tmp", path)


def _job_meta(cfg: WorkerConfig) -> dict:
    """The job description: the server stores it in its checkpoint (enough to rebuild the model) and
    refuses a worker whose description differs from the job's, naming the flags."""
    return {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(JobConfig)},
            "num_workers": cfg.num_workers, "shard": cfg.shard, "local_steps": cfg.local_steps}


def _gate_text(st: dict) -> str:
    return f"{st['registered']} of {st['num_workers']} workers registered"


class _GateReporter:
    """While the first pull is held at the start gate, say what this worker waits for ("2 of 3 workers
    registered") now and every few seconds, from a thread with its own status connection, so that the
    pull itself is answered the moment the gate opens."""

    def __init__(self, cfg: WorkerConfig, client: PSClient, every: float = 5.0):
        self.cfg, self.every = cfg, every
        self.done = threading.Event()
        self.thread = None
        try:
            st = client.status()
        except Exception:   # only a message; never in the way of training
            return
        if isinstance(st, list):   # a sharded client: one status per shard; shard 0's gate is the one
            st = st[0] if st else {}
        if st.get("started", True) or "registered" not in st:
            return
        log.info("worker %d waiting for the other workers to register: %s", cfg.rank, _gate_text(st))
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        tool = None    # connected only when needed: a connection that never says anything looks like a crash
        try:
            while not self.done.wait(self.every):
                tool = tool or PSClient(self.cfg.server.split(",")[0], server_timeout=self.every, request_timeout=1.0,
                                        curve_server=self.cfg.curve_server.split(",")[0],   # shard 0's key
                                        curve_secret=self.cfg.curve_secret)
                st = tool.status()
                if st.get("started", True):
                    return
                log.info("worker %d still waiting at the start gate: %s", self.cfg.rank, _gate_text(st))
        except Exception:
            pass
        finally:
            if tool is not None:
                tool.close()

    def stop(self) -> None:
        self.done.set()


def summarize(m: dict) -> dict:
    steps = np.array([s[4:8] for s in m["steps"]], dtype=float) if m["steps"] else np.zeros((0, 4))
    return {"rank": m["rank"], "steps": len(m["steps"]), "compute_s": float(steps[:, 0].sum()),
            "wait_s": float(steps[:, 1].sum()), "comm_s": float(steps[:, 2].sum()),
            "sleep_s": float(steps[:, 3].sum()), "wall_s": m.get("wall_s", 0.0)}
