"""Evaluate a server checkpoint with the job that produced it (held-out loss, bits/byte, a sample).

Usage::

    summary = evaluate_checkpoint("runs/cluster/checkpoint.pt", WorkerConfig(), sample_bytes=200)
"""
from __future__ import annotations

import json
import math
import os

from common.config import JobConfig, WorkerConfig, subset
from common.checkpoint import load_checkpoint
from worker.models import build_job


def evaluate_checkpoint(path: str, wcfg: WorkerConfig, sample_bytes: int = 0, out: str = "") -> dict:
    state = load_checkpoint(path)
    job_fields = {k: v for k, v in state.get("job", {}).items() if k in JobConfig.__dataclass_fields__}
    jcfg = JobConfig(**job_fields) if job_fields else subset(wcfg, JobConfig)
    job = build_job(jcfg, "cpu")
    summary: dict = {"initial_eval_loss": job.eval_loss(wcfg.eval_batches, wcfg.batch_size)}
    job.load_params(state["theta"])
    summary["final_eval_loss"] = job.eval_loss(wcfg.eval_batches, wcfg.batch_size)
    summary["version"] = int(state["version"])
    if jcfg.job == "gpt" and not jcfg.entry:
        summary["initial_bits_per_byte"] = summary["initial_eval_loss"] / math.log(2)
        summary["final_bits_per_byte"] = summary["final_eval_loss"] / math.log(2)
        if sample_bytes:
            text = job.model.generate(b"def ", sample_bytes, seed=jcfg.seed)
            summary["sample"] = text.decode("utf-8", errors="replace")
    if out:
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
