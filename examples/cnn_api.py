"""A user's own PyTorch training script, trained through paramserver with four changed lines.

A small CNN learns to tell four kinds of 12x12 synthetic images apart (a horizontal bar, a
vertical bar, a diagonal, a square), none of which the built-in jobs know. The lines marked
`# ps` are the whole change from the single-process script: two lines added, two changed (the
README's "Your own model" shows the diff).

    paramserver server --num-workers 2 --lr 0.01 &
    PS_RANK=0 PS_NUM_WORKERS=2 python examples/cnn_api.py &
    PS_RANK=1 PS_NUM_WORKERS=2 python examples/cnn_api.py
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import paramserver as ps                                                              # ps

CLASSES = 4


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def make_images(n: int, seed: int = 0, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """n noisy images (n, 1, size, size) float32 and their classes (n,) int64. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = 0.3 * rng.standard_normal((n, 1, size, size)).astype(np.float32)
    for i in range(n):
        r, c = rng.integers(2, size - 2, 2)
        if y[i] == 0:
            x[i, 0, r, :] += 1.0                                     # horizontal bar
        elif y[i] == 1:
            x[i, 0, :, c] += 1.0                                     # vertical bar
        elif y[i] == 2:
            x[i, 0, np.arange(size), (np.arange(size) + c) % size] += 1.0   # diagonal
        else:
            x[i, 0, r - 2:r + 2, c - 2:c + 2] += 1.0                 # square
    return x, y.astype(np.int64)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a held-out set."""
    device = next(model.parameters()).device
    out = model(x.to(device))
    return F.cross_entropy(out, y.to(device)).item(), (out.argmax(1).cpu() == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    x, y = make_images(2560)
    data = TensorDataset(torch.from_numpy(x[:2048]), torch.from_numpy(y[:2048]))
    x_val, y_val = torch.from_numpy(x[2048:]), torch.from_numpy(y[2048:])
    model = SmallCNN().to(device)
    opt = ps.DistributedOptimizer(model)                                               # ps
    loader = DataLoader(data, batch_size=args.batch_size, sampler=opt.sampler(data), drop_last=True)  # ps
    before = evaluate(model, x_val, y_val)
    for epoch in range(args.epochs):
        losses = []
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch}: mean train loss {np.mean(losses):.4f} ({len(losses)} steps)", flush=True)
    after = evaluate(model, x_val, y_val)
    opt.close()                                                                          # ps
    print(f"held-out loss {before[0]:.4f} -> {after[0]:.4f}, accuracy {before[1]:.3f} -> {after[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
