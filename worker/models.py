"""The jobs a worker can train: model, data, loss. The server never imports this module.

* gpt:    a byte-level decoder-only transformer (nanoGPT-style, no dropout, so runs are exact)
* mlp:    a two-layer MLP on synthetic nonlinear regression
* linear: least squares on synthetic linear data (convex: async must converge)

Usage::

    job = build_job(JobConfig(job="gpt"), device="cpu")
    x, y = job.batch(np.arange(16)); loss = job.loss(x, y); loss.backward()
"""
from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ConfigError, JobConfig
from worker.data import load_corpus, synthetic_regression


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.fc_out = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Byte-level GPT: vocabulary of 256 bytes, learned positions, pre-norm blocks."""

    def __init__(self, n_layer: int = 2, n_head: int = 4, n_embd: int = 64, context: int = 64):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(256, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 256, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():   # GPT-2's scaled init of residual projections
            if name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int, temperature: float = 0.8, seed: int = 0) -> bytes:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        device = self.wte.weight.device
        idx = torch.tensor(list(prompt) or [10], dtype=torch.long, device=device)[None]
        for _ in range(n):
            logits = self(idx[:, -self.context:])[:, -1] / temperature
            probs = F.softmax(logits.float(), dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            idx = torch.cat([idx, nxt], dim=1)
        return bytes(idx[0].tolist())


_INIT_LOCK = threading.Lock()


class Job:
    """A model with its data: `batch(indices)`, `loss(x, y)`, held-out `eval_loss()`."""

    def __init__(self, cfg: JobConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        with _INIT_LOCK:   # workers run as threads of one process (tests) must not interleave their draws
            self._build(cfg)
        self.model.to(self.device)

    def _build(self, cfg: JobConfig) -> None:
        torch.manual_seed(cfg.seed)   # every worker builds the same initial model (torch's global RNG)
        if cfg.job == "gpt":
            self.train, self.val, self.description = load_corpus(cfg.data, cfg.max_bytes)
            self.model = GPT(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context)
            self.n_samples = (len(self.train) - 1) // cfg.context
            if self.n_samples < 1 or len(self.val) <= cfg.context:
                raise ConfigError(f"corpus too small for --context {cfg.context}: {self.description}; "
                                  "give more text (--data, --max-bytes) or a shorter --context")
        else:
            x, y = synthetic_regression(cfg.n_samples, cfg.n_features, cfg.seed, nonlinear=cfg.job == "mlp")
            cut = int(0.9 * len(x))
            self.x, self.y = torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])
            self.xv, self.yv = torch.from_numpy(x[cut:]), torch.from_numpy(y[cut:])
            self.n_samples = cut
            self.description = f"synthetic {cfg.job} regression: {cut} train, {len(x) - cut} held out"
            if cfg.job == "mlp":
                self.model = nn.Sequential(nn.Linear(cfg.n_features, cfg.hidden), nn.Tanh(),
                                           nn.Linear(cfg.hidden, 1))
            else:
                self.model = nn.Linear(cfg.n_features, 1)

    def _windows(self, data: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.cfg.context
        win = np.stack([data[s:s + ctx + 1] for s in starts]).astype(np.int64)
        win = torch.from_numpy(win).to(self.device)
        return win[:, :-1], win[:, 1:]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.job == "gpt":
            return self._windows(self.train, np.asarray(indices) * self.cfg.context)
        idx = torch.from_numpy(np.asarray(indices))
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Mean loss of `model` (default: this job's model; DDP passes its wrapper) on a batch."""
        out = (model or self.model)(x)
        if self.cfg.job == "gpt":
            return F.cross_entropy(out.reshape(-1, 256), y.reshape(-1))
        return F.mse_loss(out, y)

    @torch.no_grad()
    def eval_loss(self, n_batches: int = 8, batch_size: int = 16) -> float:
        """Mean held-out loss on a fixed set of batches (nats per byte for gpt)."""
        if self.cfg.job == "gpt":
            limit = len(self.val) - self.cfg.context - 1
            starts = np.linspace(0, limit, n_batches * batch_size).astype(np.int64)
            losses = [self.loss(*self._windows(self.val, chunk)).item()
                      for chunk in np.array_split(starts, n_batches)]
            return float(np.mean(losses))
        return self.loss(self.xv.to(self.device), self.yv.to(self.device)).item()

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.model.named_parameters()}

    def load_params(self, tensors) -> None:
        """Copy theta (numpy, possibly read-only views of received frames) into the model."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only source is fine: we copy at once
            for n, p in self.model.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(tensors[n])))

    def grads_numpy(self) -> dict[str, np.ndarray]:
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
                for n, p in self.model.named_parameters()}


def build_job(cfg: JobConfig, device: str = "cpu") -> Job:
    """The built-in job `cfg.job`, or with `cfg.entry` the user's own (worker/entry.py)."""
    if cfg.entry:
        from worker.entry import EntryJob
        return EntryJob(cfg, device)
    return Job(cfg, device)


def pick_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu "
                          "or --device auto")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
