"""Divergence: how far theta moved between a worker's pull and the server applying its push.

This part owns the samples of theta that pulls take (`held`: worker -> {version: sample}) and
decides which pulls take one. A push's divergence is the L2 distance between the theta its
gradient was computed on and theta now: 0 when theta has not changed since (always so for an
applied gradient in sync), else measured from its pull's sample (exact for models up to
DIVERGENCE_SAMPLE values, else estimated from that many sampled coordinates), or None without one.

Usage::

    divergence = Divergence(cfg, store, policy, phases)
    divergence.on_pull(worker, version)               # in the PARAMS reply, once theta is snapshotted
    meta["divergence"] = divergence.measure(worker, base_version)
"""
from __future__ import annotations

from common.config import ServerConfig
from paramserver.consistency import Consistency
from paramserver.metrics import PhaseTimes
from paramserver.store import ParamStore

#: --divergence-every 0 (auto): pulls take divergence samples while divergence has cost at most this share of the
#: server's apply time so far
DIVERGENCE_BUDGET = 0.05
#: samples kept per worker: with async prefetch a worker pulls the next theta before pushing the gradient of the
#: one before; a resend of a pull may add one more
SAMPLES_KEPT = 3


class Divergence:
    """Samples of theta taken by pulls, and the divergence of the pushes computed on them."""

    def __init__(self, cfg: ServerConfig, store: ParamStore, policy: Consistency, phases: PhaseTimes):
        self.cfg, self.store, self.policy, self.phases = cfg, store, policy, phases
        self.held: dict[int, dict[int, dict]] = {}   # worker -> {version: sample of theta} of its last pulls
        self._pulls_unsampled: dict[int, int] = {}   # --divergence-every K: pulls since the worker's last sample

    def want_sample(self, worker: int) -> bool:
        """Does this pull take a divergence sample (store.sample) for the push computed on it? Never in sync
        (theta cannot change between a worker's pull and its applied push: 0, free); in ssp/async every
        --divergence-every-th pull of each worker, or (0, auto) while divergence has cost at most
        DIVERGENCE_BUDGET of the apply time so far: on a big model a sample is a small share of an apply and
        every pull gets one, on a small one (1M values: a third of an Adam apply) only some do."""
        if not self.cfg.track_divergence or self.cfg.mode == "sync":
            return False
        if self.cfg.divergence_every <= 0:   # (before the first apply there is nothing to measure it against)
            return (not self.policy.apply_s
                    or self.phases.seconds["divergence"] <= DIVERGENCE_BUDGET * self.policy.apply_s)
        n = self._pulls_unsampled.get(worker, 0) + 1
        self._pulls_unsampled[worker] = 0 if n >= self.cfg.divergence_every else n
        return n >= self.cfg.divergence_every

    def on_pull(self, worker: int, version: int) -> None:
        """A pull of theta at `version` is answered: take a sample of it if this pull is to have one."""
        if not self.want_sample(worker):
            return
        samples = self.held.setdefault(worker, {})
        samples.pop(version, None)
        with self.phases.phase("divergence"):
            samples[version] = self.store.sample()[1]
        if len(samples) > SAMPLES_KEPT:   # (a resent pull adds one: the push on the pull before stays measurable)
            del samples[next(iter(samples))]

    def measure(self, worker: int, base_version: int) -> float | None:
        """L2 distance between the theta this gradient was computed on and the server's theta now (see the
        module docstring; None without a sample, or without --track-divergence)."""
        if not self.cfg.track_divergence:
            return None
        sample = self.held.get(worker, {}).get(base_version)
        if base_version == self.store.version and (sample is not None or self.cfg.mode == "sync"):
            return 0.0   # (not for an unsampled push in ssp/async: the measured ones would lean to fresh pushes)
        return None if sample is None else self.store.distance(sample)

    def forget(self, worker: int) -> None:
        """The worker is gone: its samples and its pull count go with it."""
        self.held.pop(worker, None)
        self._pulls_unsampled.pop(worker, None)
