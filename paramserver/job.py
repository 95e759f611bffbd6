"""The job a server serves: its model, the flags its workers share, and the shard this server is of it.

This part owns the job's description (`flags`: the first worker's job flags, or the resumed
checkpoint's; the first worker's REGISTER also brings theta, every later model must match it),
the shard map (`shard`: this server's index, the shard count and the partition plan's hash, see
common/shards.py) with the full model layout the plan was built from (`layout`, to merge the
shards' checkpoints), and the checks a REGISTER must pass against them.

Usage::

    job = Job(cfg)
    plan = job.check_shard(msg)          # RequestError(shard_mismatch), or the plan to adopt
    job.check_flags(msg.meta.get("job") or {})
"""
from __future__ import annotations

import logging

from common.config import ServerConfig
from common.protocol import Message
from common.shards import ShardPlan, check_identity
from paramserver.sessions import RequestError
from paramserver.store import ParamStore

log = logging.getLogger("paramserver.server.job")   # (under the server's: its level applies)


class Job:
    """The job's flags, this server's shard and the plan's layout (see the module docstring)."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.flags: dict = {}
        self.shard = {"index": cfg.shard_index, "count": cfg.num_shards, "plan": ""}   # see common/shards.py
        self.layout: dict = {}   # the full model layout the plan was built from (to merge checkpoints)

    def check_shard(self, msg: Message) -> tuple[str, dict] | None:
        """Refuse a worker whose shard map (count, this server's index, partition plan) differs from ours.
        Returns the (plan hash, layout) the first worker brings, for `adopt` once the registration has
        succeeded (a refused REGISTER must not fix the plan for everyone after it)."""
        offered = msg.meta.get("shard")
        if offered is not None and not isinstance(offered, dict):
            raise RequestError("shard_mismatch", "REGISTER meta 'shard' must be a map {index, count, plan, layout}")
        why = check_identity(self.cfg.shard_index, self.cfg.num_shards, self.shard["plan"], offered)
        adopt = None
        if not why and offered and not self.shard["plan"]:
            try:   # the first worker's plan: recompute it from its layout, so a bad map is caught here
                plan = ShardPlan.build(offered.get("layout") or {}, self.cfg.num_shards)
            except (TypeError, ValueError, AttributeError) as exc:
                raise RequestError("shard_mismatch", f"REGISTER carries an unusable model layout: {exc}") from None
            mine = {p.key: p for p in plan.by_shard[self.cfg.shard_index]}
            if plan.hash != offered.get("plan"):
                why = (f"plan hash differs: the worker says {offered.get('plan')!r} but its layout gives "
                       f"{plan.hash!r} (another paramserver version?)")
            elif msg.tensors and set(msg.tensors) != set(mine):
                why = "the pieces this worker sent are not the ones its plan assigns to this shard"
            else:
                adopt = plan.hash, plan.layout
        if why:
            raise RequestError("shard_mismatch", why)
        return adopt

    def check_model(self, msg: Message, store: ParamStore, worker: int) -> bool:
        """The first REGISTER carries the initial parameters (theta and the job's flags come from it: True);
        every later one's model must match them (RequestError model_mismatch; no_parameters before theta)."""
        if msg.tensors:
            if not store.initialized:
                store.init(msg.tensors)
                self.flags = dict(msg.meta.get("job", {}))
                log.info("theta initialised by worker %d: %d tensors, %d values", worker, len(msg.tensors),
                         sum(t.size for t in msg.tensors.values()))
                self._say_outer()
                return True
            if {n: [t.dtype.name, list(t.shape)] for n, t in msg.tensors.items()} != store.layout():
                raise RequestError("model_mismatch", "this worker's model does not match the parameters the "
                                   "server holds (names, shapes or dtypes differ); start it with the same job "
                                   "flags as the others")
        elif not store.initialized:
            raise RequestError("no_parameters", "the server holds no parameters yet: the first REGISTER must "
                               "carry the initial parameters")
        return False

    def _say_outer(self) -> None:
        """With --local-steps H > 1 the server's optimizer is the outer one: say which, and warn when it is the
        per-step default (Adam at a per-step lr barely moves θ by a pseudo-gradient)."""
        h = self.flags.get("local_steps", 1)
        if not isinstance(h, int) or h <= 1:
            return
        log.info("the workers take %d local steps per push: --optimizer %s (lr %g) is the outer optimizer", h,
                 self.cfg.optimizer, self.cfg.lr)
        if self.cfg.optimizer == "adam":
            log.warning("--local-steps %d with the server's --optimizer adam: the pseudo-gradients are applied by "
                        "Adam at lr %g; local SGD / DiLoCo use --optimizer sgd --lr 1 (averaging) or --optimizer "
                        "nesterov --lr 0.7 --momentum 0.9 (`paramserver cluster` picks sgd --lr 1)", h, self.cfg.lr)

    def adopt(self, plan: tuple[str, dict] | None) -> None:
        """The first worker's shard plan (from check_shard) is the job's from now on."""
        if plan is not None:
            self.shard["plan"], self.layout = plan

    def check_flags(self, job: dict) -> None:
        """Refuse a worker whose job description (the flags every worker of a job shares) differs from the
        job's (the first worker's, or the resumed checkpoint's), naming each differing flag; and one that
        was started for another number of workers (it would train on the wrong share of the data)."""
        if not isinstance(job, dict):
            return
        diffs = []
        n = job.get("num_workers")
        if isinstance(n, int) and n != self.cfg.num_workers:
            diffs.append(f"--num-workers {n} (the server has --num-workers {self.cfg.num_workers})")
        for key, value in sorted(job.items()):
            if key != "num_workers" and key in self.flags and self.flags[key] != value:
                diffs.append(f"--{key.replace('_', '-')} {value!r} (the job has {self.flags[key]!r})")
        if diffs:
            raise RequestError("job_mismatch", "this worker was started with other job flags than the job it "
                               "joins: " + "; ".join(diffs) + ". Start it with the job's flags")
