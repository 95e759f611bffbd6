"""Use a server checkpoint: held-out loss, bits per byte and a generated sample, with the job that made it.

A checkpoint carries the job description the workers registered with (`job`: model size, data,
seed), so the model is rebuilt from the checkpoint alone; `--data` may point the evaluation at
other text. `paramserver eval CKPT` and `paramserver sample CKPT` are the command-line faces.

Usage::

    summary = evaluate_checkpoint("runs/cluster/checkpoint.pt", WorkerConfig(), sample_bytes=200)
    job, state = load_job("runs/cluster/checkpoint.pt"); print(sample_text(job, 200))
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from common.checkpoint import load_checkpoint
from common.config import ConfigError, JobConfig, WorkerConfig
from worker.models import build_job


def job_config(state: dict, fallback: WorkerConfig | None = None, **override) -> JobConfig:
    """The JobConfig a checkpoint was trained with (its `job` entry), else the fallback's job flags."""
    fields = {k: v for k, v in (state.get("job") or {}).items() if k in JobConfig.__dataclass_fields__}
    if not fields and fallback is None:
        raise ConfigError("this checkpoint carries no job description (no worker registered with one); "
                          "cannot rebuild its model")
    base = fields if fields else {f: getattr(fallback, f) for f in JobConfig.__dataclass_fields__}
    base.update({k: v for k, v in override.items() if v not in (None, "")})
    try:
        return JobConfig(**base)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_job(path: str, data: str = "", device: str = "cpu"):
    """(job with the checkpoint's theta loaded, checkpoint state)."""
    state = load_checkpoint(path)
    job = build_job(job_config(state, data=data), device)
    _load_theta(job, state, path)
    return job, state


def _load_theta(job, state: dict, path: str = "checkpoint") -> None:
    names = {n for n, _ in job.model.named_parameters()}
    if set(state["theta"]) != names:
        raise ConfigError(f"{path}: its parameters do not match the model of its job description")
    job.load_params(state["theta"])


def corpus_prompt(job, max_len: int = 24) -> bytes:
    """A prompt taken from the held-out text: the start of its first non-empty line (at most max_len bytes)."""
    val = bytes(np.asarray(job.val[: 4096], dtype=np.uint8))
    lines = [ln for ln in val.split(b"\n")[1:] if ln.strip()] or [val]
    line = lines[0].lstrip()[:max_len]
    cut = line.rfind(b" ", max_len // 2)       # end at a word boundary where there is one
    return line[: cut + 1] if cut > 0 else line


def sample_text(job, n_bytes: int, prompt: bytes | None = None, seed: int = 0, temperature: float = 0.8) -> str:
    """`n_bytes` generated after `prompt`, as text a terminal shows as it is (see `printable`)."""
    if job.cfg.entry:
        raise ConfigError(f"this checkpoint's model is your own (--entry {job.cfg.entry}), not a text model: "
                          "sample generates text from a checkpoint of --job gpt")
    if job.cfg.job != "gpt":
        raise ConfigError(f"--job {job.cfg.job} is a regression model: it generates no text")
    prompt = corpus_prompt(job) if prompt is None else prompt
    return printable(job.model.generate(prompt, n_bytes, temperature=temperature, seed=seed))


def printable(data: bytes) -> str:
    """UTF-8 text with what a terminal would act on escaped: a byte that is not UTF-8 as \\xNN, a control or
    other non-printable character as \\xNN / \\uNNNN; newlines and tabs stay as they are."""
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() or c in "\n\t" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def is_text_job(cfg) -> bool:
    """A built-in gpt job (bits per byte, samples), not a regression job nor the user's own model."""
    return cfg.job == "gpt" and not cfg.entry


def eval_summary(job, eval_batches: int, batch_size: int, prefix: str = "") -> dict:
    loss = job.eval_loss(eval_batches, batch_size)
    out = {f"{prefix}eval_loss": loss}
    if is_text_job(job.cfg):
        out[f"{prefix}bits_per_byte"] = loss / math.log(2)
    return out


def evaluate_checkpoint(path: str, wcfg: WorkerConfig, sample_bytes: int = 0, out: str = "",
                        start_state: dict | None = None) -> dict:
    """Held-out loss before and after (before: `start_state`'s theta, the checkpoint a run resumed, else
    the freshly initialised model), bits per byte and a sample for gpt; written to out/eval.json."""
    state = load_checkpoint(path)
    jcfg = job_config(state, wcfg)
    job = build_job(jcfg, "cpu")
    if start_state is not None:
        _load_theta(job, start_state, "the resumed checkpoint")
    summary: dict = {"initial_eval_loss": job.eval_loss(wcfg.eval_batches, wcfg.batch_size),
                     "initial_version": int(start_state["version"]) if start_state is not None else 0}
    _load_theta(job, state, path)
    summary["final_eval_loss"] = job.eval_loss(wcfg.eval_batches, wcfg.batch_size)
    summary["version"] = int(state["version"])
    if is_text_job(jcfg):
        summary["initial_bits_per_byte"] = summary["initial_eval_loss"] / math.log(2)
        summary["final_bits_per_byte"] = summary["final_eval_loss"] / math.log(2)
        if sample_bytes:
            summary["prompt"] = printable(corpus_prompt(job))
            summary["sample"] = sample_text(job, sample_bytes, seed=jcfg.seed)
    if out:
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def evaluate_path(path: str, data: str = "", eval_batches: int = 8, batch_size: int = 16) -> dict:
    """`paramserver eval`: the held-out figures of one checkpoint (of your own model: its own evaluation)."""
    entry = (load_checkpoint(path).get("job") or {}).get("entry")
    if entry and data:
        raise ConfigError(f"--data {data!r}: this checkpoint's model is your own (--entry {entry}); it is "
                          "evaluated with its own eval_loss (or its training samples), not on other text")
    job, state = load_job(path, data=data)
    return {"checkpoint": path, "version": int(state["version"]), "job": job.cfg.entry or job.cfg.job,
            "data": job.description, **eval_summary(job, eval_batches, batch_size)}

