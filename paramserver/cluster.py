"""`paramserver cluster`: one server process and N worker processes on this machine.

It shows progress while they train, stops them all cleanly on Ctrl-C or when the workers are
done (the server writes its checkpoint and metrics on the way out), then evaluates the final
checkpoint on held-out data and, for the GPT job, prints a sample generated from it.

Nothing is orphaned: on any way out of the cluster (done, Ctrl-C, a second Ctrl-C, SIGTERM, its
own crash) the workers get SIGTERM and the server a SHUTDOWN; and every child is started with a
parent-death signal (Linux), so even a `kill -9` of the cluster stops the server with a checkpoint.

Usage::

    paramserver cluster --workers 4 --mode sync --steps 200
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

from common.config import ClusterConfig, ServerConfig, WorkerConfig
from common.shards import merge_states
from paramserver.launch import ClusterError, _Signals, exit_text, last_error_line, start_server, start_workers, stop_all


class Terminated(KeyboardInterrupt):
    """SIGTERM to the cluster: stopped as on Ctrl-C, exit code 143 (128 + SIGTERM) instead of 130."""


def _progress(ps, t0: float, n: int) -> str:
    from worker.client import ServerUnavailable
    try:
        st = ps.status()
    except ServerUnavailable:
        return f"[{time.time() - t0:6.1f}s] server not answering"
    loss = f"{st['loss']:.4f}" if st["loss"] is not None else "-"
    return (f"[{time.time() - t0:6.1f}s] version {st['version']:5d} | live {st['live']}/{n} | "
            f"train loss {loss} | {st['updates_per_s']:.1f} updates/s | waiting pulls {st['waiting_pulls']}")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def preflight(scfg: ServerConfig, wcfg: WorkerConfig, ccfg: ClusterConfig | None = None) -> None:
    """Check, before any process starts, what would make the server or every worker fail (the output folder, the
    resumed checkpoint against these flags, the data and its size for --context); raises ConfigError /
    FileNotFoundError with one line."""
    from common.checkpoint import load_checkpoint
    from common.config import ConfigError
    if ccfg is not None:
        check_out(ccfg, scfg.resume)
    if wcfg.job == "gpt" and not wcfg.entry:
        from worker.data import load_corpus
        train, val, description = load_corpus(wcfg.data, wcfg.max_bytes)   # ConfigError: no text files
        if (len(train) - 1) // wcfg.context < 1 or len(val) <= wcfg.context:   # as worker/models.py's Job
            raise ConfigError(f"corpus too small for --context {wcfg.context}: {description}; give more text "
                              "(--data, --max-bytes) or a shorter --context")
    if scfg.resume:
        state = load_checkpoint(scfg.resume)
        if state.get("optimizer", scfg.optimizer) != scfg.optimizer:
            raise ConfigError(f"--resume {scfg.resume}: the checkpoint was written with --optimizer "
                              f"{state['optimizer']}; resume with the same optimizer")
        _check_resumed_job(scfg, wcfg, state)


def _check_resumed_job(scfg: ServerConfig, wcfg: WorkerConfig, state: dict) -> None:
    """What the server would refuse at its start (--mode, --aggregate, --lr, --workers: unless
    --resume-override) and what it would refuse every worker for (their job flags: --data, the model's size,
    --seed, ...), found before anything starts."""
    from common.config import ConfigError
    from paramserver.checkpointer import RESUME_MUST_MATCH
    from worker.train import _job_meta
    flag = lambda k: "--workers" if k == "num_workers" else "--" + k.replace("_", "-")   # noqa: E731
    saved = state.get("config", {})
    changed = [f"{flag(k)} {saved[k]} (now {getattr(scfg, k)})" for k in RESUME_MUST_MATCH
               if k in saved and saved[k] != getattr(scfg, k)]
    if changed and not scfg.resume_override:
        raise ConfigError(f"--resume {scfg.resume}: the checkpoint was written with {', '.join(changed)}; resume "
                          "with the same flags, or add --resume-override to continue under the new ones")
    job, mine = state.get("job") or {}, _job_meta(wcfg)
    diffs = [f"{flag(k)} {mine[k]!r} (the job has {v!r})" for k, v in sorted(job.items())
             if k != "num_workers" and k in mine and mine[k] != v]
    if diffs:   # the server would refuse every worker (job_mismatch) with these words
        raise ConfigError(f"--resume {scfg.resume}: its job was trained with other flags: {'; '.join(diffs)}. "
                          "Resume with the job's flags")


#: what a cluster run leaves in its --out folder that a later run would replace
RUN_FILES = ("checkpoint.pt", "metrics.json")


def check_out(ccfg: ClusterConfig, resume: str = "") -> None:
    """Refuse an --out folder that holds an earlier run (its checkpoint or metrics), unless this run continues
    it (--resume names a checkpoint in that folder) or --overwrite says to replace it."""
    from common.config import ConfigError
    out = ccfg.out
    if ccfg.overwrite or not os.path.isdir(out):
        return
    if resume and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(out):
        return
    found = [f for f in sorted(os.listdir(out)) if f in RUN_FILES or (f.startswith("checkpoint-shard") and
                                                                       f.endswith(".pt"))]
    if found:
        raise ConfigError(f"--out {out} holds an earlier run ({', '.join(found)}): choose another folder with "
                          f"--out, continue it with --resume {os.path.join(out, 'checkpoint.pt')}, or pass "
                          "--overwrite to replace it")


def cluster_keys(folder: str, n: int, shards: int = 1) -> list[dict]:
    """The CurveZMQ keys of a cluster run in `folder`: one server key pair per server (`server`, or
    `server-shard0..K-1` with K shards), worker0..n-1 and an admin key `cluster` for the cluster's own
    monitor and SHUTDOWN; those missing are created. Returns, per server in shard order, the client kwargs
    of the cluster's own connections to it."""
    from common.security import make_keys, server_key_names
    have = lambda name: os.path.exists(os.path.join(folder, name + ".key_secret"))   # noqa: E731
    servers = server_key_names(shards)
    missing = [name for name in list(servers) + [f"worker{r}" for r in range(n)] if not have(name)]
    admins = () if have("cluster") else ("cluster",)
    if missing or admins:
        make_keys(folder, tuple(missing), admins=admins)
    return [{"curve_server": os.path.join(folder, name + ".key"),
             "curve_secret": os.path.join(folder, "cluster.key_secret")} for name in servers]


def _prepare_out(out: str, keep: list[str]) -> None:
    """Remove the outputs of an earlier run in `out` (its checkpoints, shards' included, and metrics), except
    the checkpoints being resumed."""
    os.makedirs(out, exist_ok=True)
    keep_real = {os.path.realpath(k) for k in keep if k}
    for stale in ["checkpoint.pt", "server_metrics.json", "metrics.json", "eval.json"] + \
            [f for f in os.listdir(out) if (f.startswith("worker") and f.endswith(".json"))
             or (f.startswith("checkpoint-shard") and f.endswith(".pt"))
             or (f.startswith("server_metrics-shard") and f.endswith(".json"))]:
        path = os.path.join(out, stale)
        if os.path.exists(path) and os.path.realpath(path) not in keep_real:
            os.unlink(path)


def shard_resumes(resume: str, shards: int) -> list[str]:
    """--resume PATH with --shards K: shard i resumes from checkpoint-shardI.pt beside PATH (a `cluster --shards K`
    run writes them there, with the merged checkpoint.pt). Raises ClusterError naming what is missing."""
    folder = os.path.dirname(os.path.abspath(resume))
    paths = [os.path.join(folder, f"checkpoint-shard{i}.pt") for i in range(shards)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ClusterError(f"--resume {resume} with --shards {shards}: each shard resumes from its own checkpoint, "
                           f"written beside the merged one by a `paramserver cluster --shards {shards}` run; "
                           f"missing {', '.join(missing)} (a checkpoint of a run with one server resumes with "
                           "--shards 1)")
    return paths


def _written_since(path: str, t0: float) -> bool:
    return os.path.exists(path) and os.path.getmtime(path) >= t0 - 1.0


@dataclasses.dataclass
class _Plan:
    """What a cluster run starts from: one server config per shard, their logs, keys and the resumed state."""
    out: str
    shards: int
    cfgs: list            # ServerConfig per shard (one without shards)
    logs: list[str]       # each server's log file name in `out`
    keys: str             # the CurveZMQ key folder ("" without encryption)
    curves: list[dict]    # per server: the client kwargs of the cluster's own connections to it
    threads: int          # torch threads per worker
    start_state: dict | None   # the resumed model ("before" in the held-out loss), None for a fresh run

    @property
    def start_version(self) -> int:
        return int(self.start_state["version"]) if self.start_state is not None else 0


@dataclasses.dataclass
class _Outcome:
    """How the processes of a run ended."""
    servers: list = dataclasses.field(default_factory=list)    # in shard order, appended as they start
    addresses: list = dataclasses.field(default_factory=list)
    workers: list = dataclasses.field(default_factory=list)
    interrupted: bool = False
    failure: str = ""      # the first failure's one-line account ("" when none)
    exit_code: int = 0     # an interrupt's: 130 (Ctrl-C), 143 (SIGTERM)


def run_cluster(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig) -> int:
    """One server (or --shards K server shards) and --workers worker processes, to the end of the run:
    plan the configs, start and watch the processes, stop them, then report (and evaluate) what they did."""
    plan = _plan(ccfg, scfg, wcfg)
    print(_header(ccfg, scfg, wcfg, plan), flush=True)
    t0 = time.time()
    run = _supervise(ccfg, wcfg, plan, t0)
    return _report(ccfg, scfg, wcfg, plan, run, t0)


def _plan(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig) -> _Plan:
    """Each server's config (output files in --out, keys, threads, shard index, resumed file); clears the outputs
    of an earlier run in --out, after reading the checkpoint being resumed."""
    from common.checkpoint import load_checkpoint
    from common.security import server_key_names
    out, k = ccfg.out, ccfg.shards
    resumes = ([scfg.resume] if k == 1 else shard_resumes(scfg.resume, k)) if scfg.resume else []
    # read before it is overwritten: the model the run starts from ("before" in the held-out loss)
    start_state = None
    if resumes:
        start_state = load_checkpoint(resumes[0]) if k == 1 else merge_states([load_checkpoint(p) for p in resumes])
    _prepare_out(out, [scfg.resume] + resumes)
    scfg.checkpoint = os.path.join(out, "checkpoint.pt")
    scfg.metrics = os.path.join(out, "server_metrics.json")
    scfg.bind = "tcp://127.0.0.1:*"
    keys = ccfg.keys or (os.path.join(out, "keys") if ccfg.curve else "")
    curves: list[dict] = [{} for _ in range(k)]
    if keys:
        curves = cluster_keys(keys, ccfg.workers, k)
        scfg.curve_secret = os.path.join(keys, "server.key_secret")
        scfg.auth = os.path.join(keys, "clients")
    threads = wcfg.threads or max(1, (os.cpu_count() or 1) // ccfg.workers)
    scfg.threads = scfg.threads or max(1, (os.cpu_count() or 1) // (ccfg.workers + k))
    cfgs = [scfg]
    if k > 1:   # each shard: its index, its own checkpoint, metrics, key pair, resumed file and metrics port
        cfgs = [dataclasses.replace(c, resume=resumes[i] if resumes else "",
                                    **({"curve_secret": os.path.join(keys, name + ".key_secret")} if keys else {}))
                for i, (c, name) in enumerate(zip(shard_configs(scfg, k, out), server_key_names(k)))]
    logs = ["server.log"] if k == 1 else [f"server-shard{i}.log" for i in range(k)]
    return _Plan(out, k, cfgs, logs, keys, curves, threads, start_state)


def _header(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig, plan: _Plan) -> str:
    """The run's first line: servers, workers, job, mode, steps, optimizer, straggler, keys, output folder."""
    mode = scfg.mode + (f" (staleness bound {scfg.staleness})" if scfg.mode == "ssp" else "") + \
        (f" ({scfg.backup_workers} backup workers)" if scfg.backup_workers else "")
    straggler = (f", straggler: worker {ccfg.workers - 1} x{ccfg.straggler:g}"
                 + (f" on {wcfg.slowdown_prob:.0%} of its steps" if wcfg.slowdown_prob < 1 else "")
                 if ccfg.straggler > 1.0 else "")
    servers_text = "1 server" if plan.shards == 1 else f"{plan.shards} server shards"
    return (f"paramserver cluster: {servers_text} + {ccfg.workers} workers, job {wcfg.entry or wcfg.job}, "
            f"mode {mode}, {wcfg.steps} steps/worker, optimizer {scfg.optimizer} lr {scfg.lr}{straggler}"
            f"{', CurveZMQ keys in ' + plan.keys if plan.keys else ''}, output in {plan.out}/")


def _supervise(ccfg: ClusterConfig, wcfg: WorkerConfig, plan: _Plan, t0: float) -> _Outcome:
    """Start the servers, then the workers; print progress until the workers are done, a process fails or
    Ctrl-C; then stop everything in order (workers first, then each server with its checkpoint)."""
    from worker.client import PSClient
    run, monitors, k = _Outcome(), [], plan.shards
    try:
        for i, c in enumerate(plan.cfgs):
            try:
                run.addresses.append(start_server(c, plan.out, procs=run.servers, log_name=plan.logs[i])[1])
            except ClusterError as exc:
                raise ClusterError(f"shard {i}: {exc}" if k > 1 else str(exc)) from None
        slow = {ccfg.workers - 1: ccfg.straggler} if ccfg.straggler > 1.0 else None
        start_workers(wcfg, ccfg.workers, ",".join(run.addresses), plan.out, slow, plan.threads, wcfg.slowdown_prob,
                      procs=run.workers, keys=plan.keys)
        # one connection per server for all status calls
        monitors = [PSClient(a, server_timeout=2.0, request_timeout=1.0, **c)
                    for a, c in zip(run.addresses, plan.curves)]
        run.failure = _watch(ccfg, plan, run, monitors, t0)
    except KeyboardInterrupt as exc:
        run.interrupted = True
        run.exit_code = 143 if isinstance(exc, Terminated) else 130
        print(f"\ninterrupted: stopping workers and {'server' if k == 1 else 'server shards'} (each server writes "
              "its checkpoint)", flush=True)
    except ClusterError as exc:
        run.failure = str(exc)
    finally:
        with _Signals() as sigs:
            for m in monitors:
                m.close()
            stop_all(run.workers, None, "")
            for i, proc in enumerate(run.servers):
                stop_all([], proc, run.addresses[i] if i < len(run.addresses) else "", plan.curves[i])
            if sigs.again:
                run.interrupted = True
                run.exit_code = run.exit_code or 130
    return run


def _watch(ccfg: ClusterConfig, plan: _Plan, run: _Outcome, monitors: list, t0: float) -> str:
    """While workers run: a progress line every --progress-every seconds; returns the first failure (a server
    that exited, a worker that failed: the others would wait for it) or "" once every worker is done."""
    k, next_tick = plan.shards, time.time() + ccfg.progress_every
    while any(p.poll() is None for p in run.workers):
        time.sleep(0.2)
        if time.time() >= next_tick:
            next_tick += ccfg.progress_every
            print(_progress(monitors[0], t0, ccfg.workers) if k == 1 else
                  " | ".join(f"shard {i} " + _progress(m, t0, ccfg.workers) for i, m in enumerate(monitors)),
                  flush=True)
        dead = [i for i, proc in enumerate(run.servers) if proc.poll() is not None]
        if dead:
            i = dead[0]
            return (f"the server{f' shard {i}' if k > 1 else ''} {exit_text(run.servers[i].returncode)}: "
                    f"{last_error_line(os.path.join(plan.out, plan.logs[i]))}")
        bad = [r for r, p in enumerate(run.workers) if p.poll() not in (None, 0)]
        if bad:
            r = bad[0]
            return (f"worker {r} {exit_text(run.workers[r].returncode)}: "
                    f"{last_error_line(os.path.join(plan.out, f'worker{r}.log'))}")
    return ""


def _report(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig, plan: _Plan, run: _Outcome,
            t0: float) -> int:
    """Write metrics.json (summary, servers', workers'), evaluate the final checkpoint and print the summary;
    returns the exit code: 1 when a process failed, else 130 / 143 when Ctrl-C / SIGTERM stopped the run."""
    from worker.evaluate import evaluate_checkpoint
    out, k, cfgs, failure = plan.out, plan.shards, plan.cfgs, run.failure
    if failure:
        print(failure, flush=True)
    failed = [r for r, p in enumerate(run.workers) if p.returncode not in (0, -signal.SIGTERM, 143)]
    for r in failed:
        if not failure.startswith(f"worker {r} "):
            print(f"worker {r} {exit_text(run.workers[r].returncode)}; see {out}/worker{r}.log", flush=True)
    wall = time.time() - t0
    summary = {"wall_s": round(wall, 2), "interrupted": run.interrupted, "failed_workers": failed,
               "failure": failure, **({"shards": k} if k > 1 else {})}
    written = bool(run.servers) and all(_written_since(c.checkpoint, t0) for c in cfgs)
    if written and k > 1:   # one unsharded checkpoint for evaluate and for --resume with --shards 1
        summary["shard_versions"] = merge_checkpoints([c.checkpoint for c in cfgs], scfg.checkpoint)["shard_versions"]
    servers_m = [_read_json(c.metrics) for c in cfgs]
    st = servers_m[0].get("status", {})
    start_version = plan.start_version
    end_version = int(st.get("version", start_version))
    summary.update(start_version=start_version, end_version=end_version, updates=end_version - start_version)
    if written and end_version > start_version:   # a run that trained nothing has no "after" to report
        summary.update(evaluate_checkpoint(scfg.checkpoint, wcfg, ccfg.sample_bytes, out,
                                           start_state=plan.start_state))
    workers_m = {str(r): _read_json(os.path.join(out, f"worker{r}.json")) for r in range(ccfg.workers)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "server": servers_m[0], **({"shards": servers_m} if k > 1 else {}),
                   "workers": workers_m}, f)
    if k > 1:
        for i, m in enumerate(servers_m):
            sst = m.get("status", {})
            print(f"shard {i}: version {sst.get('version', 0)}, counters {sst.get('counters', {})}")
    resumed = f" (version {start_version} -> {end_version}, resumed from {scfg.resume})" if scfg.resume else ""
    print(f"done in {wall:.1f}s: {end_version - start_version} updates applied in this run{resumed}"
          + (f", counters {st.get('counters', {})}" if k == 1 else ""))
    _print_outcome(summary, plan.start_state is not None)
    if not written:
        where = "none written"
    elif k == 1:
        where = scfg.checkpoint
    else:
        where = f"{', '.join(c.checkpoint for c in cfgs)} (merged: {scfg.checkpoint})"
    print(f"checkpoint{'s' if k > 1 else ''}: {where}   metrics: {os.path.join(out, 'metrics.json')}", flush=True)
    return 1 if failed or failure else (run.exit_code or 130) if run.interrupted else 0


def _print_outcome(summary: dict, resumed: bool) -> None:
    """The held-out loss before -> after, and the GPT job's sample."""
    if "final_eval_loss" in summary:
        first = summary.get("initial_eval_loss")
        print(f"held-out loss: {first:.4f} -> {summary['final_eval_loss']:.4f}"
              + (f" ({summary['final_bits_per_byte']:.3f} bits/byte)" if "final_bits_per_byte" in summary else "")
              + (" (before: the resumed model)" if resumed else ""))
    else:
        print("held-out loss: not measured (no update was applied in this run)")
    if summary.get("sample"):
        print(f"sample from the trained model (prompt {summary['prompt']!r} from the held-out text):\n"
              + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)


def shard_configs(scfg: ServerConfig, shards: int, out: str) -> list[ServerConfig]:
    """One server config per shard: its index, its own checkpoint and metrics files, and (--metrics-port P)
    its own Prometheus port P + index."""
    return [dataclasses.replace(scfg, shard_index=i, num_shards=shards,
                                checkpoint=os.path.join(out, f"checkpoint-shard{i}.pt"),
                                metrics=os.path.join(out, f"server_metrics-shard{i}.json"),
                                metrics_port=scfg.metrics_port + i if scfg.metrics_port else 0)
            for i in range(shards)]


def merge_checkpoints(paths: list[str], path: str) -> dict:
    """Merge the shards' checkpoints into one unsharded checkpoint at `path` (see common/shards.merge_states)."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    merged = merge_states([load_checkpoint(p) for p in paths])
    save_checkpoint(path, merged)
    return merged
