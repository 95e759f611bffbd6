"""paramserver: a parameter server for data-parallel training.

The names a user's own worker needs, imported on first use: `import paramserver` itself imports no
torch, and `PSClient`, `connect`, `worker_config` and `ShardSampler` never do (numpy only). The server
does import torch: its update rule runs in torch (paramserver/update.py, through store.py) and its
checkpoints are torch files (common/checkpoint.py).

    import paramserver as ps
    opt = ps.DistributedOptimizer(model)        # PyTorch: worker/api.py
    client = ps.connect(ps.worker_config())     # any framework, numpy only: worker/connect.py
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DistributedOptimizer": "worker.api",       # the PyTorch API
    "UserJob": "worker.entry",                  # what an --entry function returns
    "ShardSampler": "worker.sampler",           # numpy only
    "PSClient": "worker.client",                # numpy only
    "ServerError": "worker.client",
    "ServerUnavailable": "worker.client",
    "connect": "worker.connect",                # numpy only
    "worker_config": "worker.connect",
    "add_arguments": "worker.connect",
    "ConfigError": "common.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'paramserver' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
