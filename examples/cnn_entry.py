"""The CNN of `cnn_api.py` through `--entry`: no training loop to write.

    paramserver cluster --entry examples.cnn_entry:make_job --workers 2 --steps 60 --lr 0.01 --out runs/cnn

(run from the folder that holds `examples/`; `paramserver worker` and `paramserver bench
consistency` take the same `--entry`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import paramserver as ps
from examples.cnn_api import SmallCNN, make_images


def make_job() -> "ps.UserJob":
    x, y = make_images(2560)
    x_train, y_train = torch.from_numpy(x[:2048]), torch.from_numpy(y[:2048])
    x_val, y_val = torch.from_numpy(x[2048:]), torch.from_numpy(y[2048:])

    def batch(indices: np.ndarray):
        idx = torch.from_numpy(indices)
        return x_train[idx], y_train[idx]

    def eval_loss(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        return F.cross_entropy(model(x_val.to(device)), y_val.to(device)).item()

    return ps.UserJob(model=SmallCNN(), loss=F.cross_entropy, batch=batch, n_samples=len(x_train),
                      eval_loss=eval_loss, description="SmallCNN on 2048 synthetic 12x12 images (4 classes)")
