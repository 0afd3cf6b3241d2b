"""A tiny conv denoiser implementing TrainableModel, for the training-loop tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class TinyDenoiser(nn.Module):
    """eps-prediction on ``batch["image"]`` with log-normal sigmas, all noise from ``generator``.

    ``noise_from_index``: draw each sample's noise from a generator seeded by its dataset index
    (so a sample gets the same noise however the batch is split across ranks).
    ``sleep``: seconds to sleep per call (lets a test kill a run mid-way).
    ``nan_calls``: call numbers (0-based) whose loss is NaN.
    ``dtype_log``: a file prefix; each process appends the dtype of every network output to
    ``<prefix>.<pid>`` (what a run in its own processes computed in).
    """

    def __init__(self, channels: int = 3, width: int = 8, *, noise_from_index: bool = False,
                 sleep: float = 0.0, nan_calls: tuple[int, ...] = (), dtype_log: str = "") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1))
        self.register_buffer("calls_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.noise_from_index = noise_from_index
        self.sleep = sleep
        self.nan_calls = set(nan_calls)
        self.dtype_log = dtype_log
        self._calls = 0

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_in = 1 / torch.sqrt(1 + sigma**2)  # (B,)
        smap = sigma.log().view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        out = self.net(torch.cat([x * c_in.view(-1, 1, 1, 1), smap], dim=1))
        if self.dtype_log:
            with open(f"{self.dtype_log}.{os.getpid()}", "a") as f:
                f.write(f"{out.dtype}\n")
        return out

    def _draw(self, x0: Tensor, batch: Mapping[str, Any], generator: torch.Generator | None):
        if self.noise_from_index:
            sig, noise = [], []
            for i in batch["index"].tolist():
                g = torch.Generator().manual_seed(int(i))
                sig.append(torch.randn((), generator=g))
                noise.append(torch.randn(x0.shape[1:], generator=g))
            return torch.stack(sig).to(x0), torch.stack(noise).to(x0)
        sig = torch.randn(x0.shape[0], generator=generator, device=x0.device)
        return sig, torch.randn(x0.shape, generator=generator, device=x0.device)

    def training_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        x0 = batch["image"]  # (B, C, H, W)
        z, noise = self._draw(x0, batch, generator)
        sigma = torch.exp(z * 1.2 - 1.2)  # (B,)
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        loss = (self(x_t, sigma) - noise).pow(2).mean()
        call, self._calls = self._calls, self._calls + 1
        if call in self.nan_calls:
            loss = loss * float("nan")
        return loss

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.net.parameters()

    @torch.no_grad()
    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
        x = torch.randn(len(prompts), 3, 8, 8, generator=generator) * sigmas[0]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            eps = self(x, s.expand(x.shape[0]))
            x = x + (s_next - s) * eps  # Euler step of dx/dsigma = eps
        return x.clamp(-1, 1)


class DictDataset(torch.utils.data.Dataset):
    """Deterministic random images as sample dicts with their index."""

    def __init__(self, n: int = 32, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "index": i}
