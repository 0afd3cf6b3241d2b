"""Run logging on rank 0: TensorBoard scalars and image grids, a JSONL file, a tqdm bar."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["MetricsLogger", "peak_memory_mb"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on GPUs, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsLogger:
    """Writes scalars to TensorBoard (``<dir>/tensorboard``) and ``<dir>/metrics.jsonl``, and
    drives a progress bar. Every method is a no-op when ``enabled`` is False (ranks > 0)."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, total_steps: int, initial_step: int,
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        self._writer: Any = None
        self._bar: Any = None
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self._truncate_after(initial_step)
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self._writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=initial_step + 1)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not progress_bar)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop JSONL lines a killed run wrote past the checkpoint it resumes from."""
        if not self.jsonl.exists():
            return
        keep = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.jsonl.write_text("".join(line + "\n" for line in keep))

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log ``metrics`` at ``step`` to TensorBoard (under ``train/``) and the JSONL file."""
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        if self._bar is not None and "loss" in metrics:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics.get('lr', 0):.3g}")

    def log_images(self, step: int, tag: str, images: Tensor) -> Path | None:
        """Log ``(N, 3, H, W)`` images in [-1, 1] as one grid: to TensorBoard and as
        ``<dir>/samples/<tag>-<step, 6 digits>.png``, whose path is returned (None on ranks > 0)."""
        if not self.enabled:
            return None
        import numpy as np

        from t2i_engine.utils.images import make_grid, save_png

        image = make_grid(images.detach().float().cpu()).convert("RGB")
        self._writer.add_image(tag, np.asarray(image), step, dataformats="HWC")  # (H, W, 3) uint8
        path = self.dir / "samples" / f"{tag.replace('/', '-')}-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, str(path), metadata={"step": str(step), "tag": tag})
        return path

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Log ``text`` (markdown) at ``step`` to TensorBoard's text tab (the JSONL file keeps
        numbers only)."""
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar (its ETA comes from tqdm's rate estimate)."""
        if self.enabled and self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Flush and close the writer and the bar."""
        if self.enabled:
            self._writer.close()
            self._bar.close()
