"""`--entry package.module:function`: your own model in the CLI, the local cluster and the benchmark.

The function takes no arguments and returns a `UserJob`: the model, the loss, and the data as
`n_samples` samples that a worker asks for by index (either `batch(indices) -> (x, y)` or a
map-style `dataset` whose items are `(x, y)` pairs). Every worker calls it once, after
`torch.manual_seed(--seed)`; its data must be the same on every worker (the workers split it by
index with --shard). The worker loop, sharding, accumulation, evaluation and metrics are the
built-in jobs'.

Usage (a module `mymodel.py` in the current folder or on PYTHONPATH)::

    def make_job():
        return UserJob(model=Net(), loss=torch.nn.functional.cross_entropy, batch=lambda idx: (X[idx], Y[idx]),
                       n_samples=len(X))
    # paramserver cluster --entry mymodel:make_job --workers 2
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from common.config import ConfigError, JobConfig
from worker.transfer import ParamIO

_BUILD_LOCK = threading.Lock()


@dataclass
class UserJob:
    """What an --entry function returns.

    model:     the torch.nn.Module to train (built on the CPU; the worker moves it to --device)
    loss:      loss(output, y) -> scalar tensor, the mean over the batch; output = model(x)
    n_samples: the number of training samples (indices 0..n_samples-1 are split over the workers)
    batch:     batch(indices: np.ndarray) -> (x, y), tensors (or tuples/dicts of tensors) on the CPU;
               or instead
    dataset:   a map-style data set, dataset[i] -> (x, y), batched with torch's default_collate
    eval_loss: optional; eval_loss(model) -> float, the held-out loss (rank 0 reports it every
               --eval-every steps, `paramserver cluster` before and after). Without it, the loss on
               the first --eval-batches x --batch-size training samples is reported instead.
    description: one line shown in logs and metrics
    """

    model: torch.nn.Module
    loss: Callable[[Any, Any], torch.Tensor]
    n_samples: int = 0
    batch: Callable[[np.ndarray], Any] | None = None
    dataset: Any = None
    eval_loss: Callable[[torch.nn.Module], float] | None = None
    description: str = ""


def load_entry(spec: str) -> Callable[[], UserJob]:
    """The function named by `package.module:function`; ConfigError (one line) if it cannot be found."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"--entry {spec!r} must be package.module:function")
    if os.getcwd() not in sys.path:   # the console script does not put the current folder on the path
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"--entry {spec!r}: no module named {exc.name!r} (looked in the current folder "
                              "and on PYTHONPATH)") from None
        raise ConfigError(user_error(f"--entry {spec!r}: importing {module_name} raised", exc)) from None
    except Exception as exc:   # a syntax error, a failed import or a raise in the user's module: their lines only
        raise ConfigError(user_error(f"--entry {spec!r}: importing {module_name} raised", exc)) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"--entry {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                          f"attribute {func_name!r}")
    if not callable(func):
        raise ConfigError(f"--entry {spec!r}: {func_name!r} is not a function (it is {type(func).__name__})")
    try:
        inspect.signature(func).bind()
    except TypeError:
        raise ConfigError(f"--entry {spec!r}: {func_name}{inspect.signature(func)} needs arguments; an entry "
                          "function takes none") from None
    except ValueError:   # no signature to inspect (some builtins): let the call decide
        pass
    return func


#: paramserver's own packages: their frames are left out of the account of a user's error
_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p) + os.sep
              for p in ("paramserver", "worker", "common"))


def user_error(what: str, exc: BaseException) -> str:
    """`what` and the exception on one line, then the user's own frames of its traceback (file, line, code):
    not paramserver's, not importlib's, not the installed libraries' (unless no other frame is left)."""
    import sysconfig
    import traceback
    libs = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "purelib", "platlib")})
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_OURS) and not f.filename.startswith("<frozen")]
    frames = [f for f in frames if not os.path.abspath(f.filename).startswith(libs)] or frames[-1:]
    lines = [f"{what} {type(exc).__name__}: {exc}".rstrip()]
    for f in frames:
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}' + (f"\n    {f.line}" if f.line else ""))
    if isinstance(exc, SyntaxError) and exc.filename:   # where the bad line is: the exception itself says
        lines = [f"{what} {type(exc).__name__}: {exc.msg}", f'  File "{exc.filename}", line {exc.lineno}'
                 + (f"\n    {exc.text.strip()}" if exc.text else "")]
    return "\n".join(lines)


def make_user_job(cfg: JobConfig) -> UserJob:
    """Call the --entry function (after seeding torch with --seed) and check what it returns."""
    func = load_entry(cfg.entry)
    with _BUILD_LOCK:   # workers in threads of one process: each builds from the seeded generator in turn
        torch.manual_seed(cfg.seed)
        try:
            job = func()
        except Exception as exc:
            raise ConfigError(user_error(f"--entry {cfg.entry!r} raised", exc)) from None
    if not isinstance(job, UserJob):
        raise ConfigError(f"--entry {cfg.entry!r} returned {type(job).__name__}; it must return "
                          "paramserver.UserJob(model=..., loss=..., batch=... or dataset=..., n_samples=...)")
    if not isinstance(job.model, torch.nn.Module):
        raise ConfigError(f"--entry {cfg.entry!r}: UserJob.model is {type(job.model).__name__}, not a torch.nn.Module")
    if not callable(job.loss):
        raise ConfigError(f"--entry {cfg.entry!r}: UserJob.loss must be a function loss(output, y)")
    if (job.batch is None) == (job.dataset is None):
        raise ConfigError(f"--entry {cfg.entry!r}: give UserJob exactly one of batch= or dataset=")
    if job.dataset is not None and not job.n_samples:
        job.n_samples = len(job.dataset)
    if not isinstance(job.n_samples, (int, np.integer)) or job.n_samples < 1:
        raise ConfigError(f"--entry {cfg.entry!r}: UserJob.n_samples must be a positive int, got {job.n_samples!r}")
    return job


def _to(obj, device: torch.device):
    """Move tensors (in tuples, lists and dicts) to `device`; pinned first when it is a GPU."""
    if torch.is_tensor(obj):
        if device.type == "cuda" and not obj.is_cuda:
            return obj.pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class EntryJob:
    """A UserJob behind the interface of the built-in jobs (worker/models.py `Job`)."""

    def __init__(self, cfg: JobConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.user = make_user_job(cfg)
        self.model = self.user.model.to(self.device)
        self.n_samples = int(self.user.n_samples)
        self.description = self.user.description or \
            f"--entry {cfg.entry}: {type(self.model).__name__}, {self.n_samples} samples"
        self.io = ParamIO(self.model)

    def batch(self, indices: np.ndarray):
        idx = np.asarray(indices)
        if self.user.batch is not None:
            x, y = self.user.batch(idx)
        else:
            from torch.utils.data import default_collate
            x, y = default_collate([self.user.dataset[int(i)] for i in idx])
        return _to(x, self.device), _to(y, self.device)

    def loss(self, x, y, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Mean loss of `model` (default: this job's model; DDP passes its wrapper) on a batch."""
        return self.user.loss((model or self.model)(x), y)

    @torch.no_grad()
    def eval_loss(self, n_batches: int = 8, batch_size: int = 16) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            if self.user.eval_loss is not None:
                return float(self.user.eval_loss(self.model))
            idx = np.arange(min(self.n_samples, n_batches * batch_size))
            return float(np.mean([self.loss(*self.batch(chunk)).item()
                                  for chunk in np.array_split(idx, max(1, len(idx) // batch_size))]))
        finally:
            self.model.train(was_training)

    def params_numpy(self) -> dict[str, np.ndarray]:
        return self.io.numpy_params()

    def load_params(self, tensors) -> None:
        self.io.load(tensors)

    def grads_numpy(self) -> dict[str, np.ndarray]:
        return self.io.grads({n: p.grad for n, p in self.io.params.items()})
