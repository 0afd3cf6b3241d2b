"""``controlnet-eval``: how well a ControlNet for the shapes model puts the shape where the hint
says (the embedded demo's measure).

For each of ``count`` samples of a ``controlnet-shapes`` split (held-out prompts and hints) it
samples the caption with the hint through the ControlNet, and (``compare_without``) the same
caption and noise without it, then reads each image with the core's pixel classifier
(:mod:`t2i_engine.data.shapes_eval`): the intersection over union of the shape it finds
(:func:`~t2i_engine.data.shapes_eval.foreground_mask`) with the hint's mask, and the colour,
background and shape accuracy against the caption's labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from t2i_engine.conditioning.config import ConditionerKeys
from t2i_engine.config.fields import existing_path, option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["ControlNetEvalConfig", "ControlNetEvalTask", "iou"]

_ge1 = attrs.validators.ge(1)


@attrs.frozen
class ControlNetEvalConfig:
    """``[task] name = "controlnet-eval"``; ``[data]`` (type = "controlnet-shapes") gives the prompts and hints."""

    controlnet: str = existing_path(help="the ControlNet (a diffusers folder or an lllyasviel-layout file)")
    count: int = option(default=64, validator=_ge1, help="samples of the split evaluated")
    batch_size: int = option(default=32, validator=_ge1, help="images per sampler run")
    scale: float = option(default=1.0, help="the ControlNet's scale")
    start: float = option(default=0.0, help="first fraction of the sampling steps the ControlNet acts on (the core's rule)")
    end: float = option(default=1.0, help="last fraction of the sampling steps the ControlNet acts on (the core's rule)")
    compare_without: bool = option(default=True, help="also sample without the ControlNet (the baseline)")
    grid: str | None = option(default="controlnet-eval-grid.png",
                              help="rows of hint | with | without for the first 16 samples (\"\": no grid)")
    iou_target: float = option(default=0.8, help="target mean IoU with the ControlNet")
    colour_target: float = option(default=0.95, help="target colour accuracy with the ControlNet")
    shape_target: float = option(default=0.95, help="target shape accuracy with the ControlNet")

    def __attrs_post_init__(self) -> None:
        ConditionerKeys(scale=self.scale, start=self.start, end=self.end)  # the core's checks of the window


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


class ControlNetEvalTask:
    """Sample held-out prompts with held-out hints, with and without the ControlNet; score them."""

    Config = ControlNetEvalConfig

    def __init__(self, config: ControlNetEvalConfig) -> None:
        self.config = config

    def _chain(self, model: Any) -> Any:
        from t2i_engine.conditioning.chain import ConditionerChain, Entry
        from t2i_engine.conditioning.config import ConditionerKeys
        from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig

        conditioner = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=self.config.controlnet))
        conditioner.setup(model)
        device = next(model.denoiser.parameters()).device
        c = self.config
        # no input file: each chunk's hints are set per sample
        keys = ConditionerKeys(scale=c.scale, start=c.start, end=c.end)
        return ConditionerChain([Entry(conditioner, keys=keys, label="controlnet-eval")]).to(device)

    def _sample(self, ctx: RunContext, model: Any, sampler: Any, precision: Any, samples: list[dict[str, Any]],
                chain: Any) -> Tensor:
        from t2i_engine.tasks.grid import sample_batched
        from t2i_plugin_controlnet.conditioner import HINT_INPUT

        c, size = self.config, int(samples[0]["hint"].shape[-1])
        out = []
        for start in range(0, len(samples), c.batch_size):
            chunk = samples[start:start + c.batch_size]
            if chain is not None:  # every sample its own hint
                chain.set_images(0, HINT_INPUT, torch.stack([s["hint"] for s in chunk]))
            out.append(sample_batched(model, [s["caption"] for s in chunk], [ctx.seed + s["index"] for s in chunk],
                                      sampler=sampler, guidance=ctx.config.guidance, size=size,
                                      batch_size=len(chunk), progress=False, precision=precision,
                                      conditioners=chain))
        return torch.cat(out)

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify_batch, foreground_mask
        from t2i_engine.tasks.grid import model_and_sampler
        from t2i_plugin_controlnet.data import ShapeHints, hint_mask

        c = self.config
        data = ctx.plugins.build(ctx.config.data) if ctx.config.data is not None else None
        if not isinstance(data, ShapeHints):
            raise ConfigError("data: controlnet-eval needs [data] type = \"controlnet-shapes\" (held-out split)")
        samples = [data[i] for i in range(min(c.count, len(data)))]
        truth = [ShapeLabels(s["colour_label"], s["shape_label"], s["background_label"]) for s in samples]
        model, sampler, precision = model_and_sampler(ctx, task="controlnet-eval")
        runs = {"with": self._chain(model)}
        if c.compare_without:
            runs["without"] = None
        summary: dict[str, Any] = {"images": len(samples)}
        images = {}
        for name, chain in runs.items():
            images[name] = self._sample(ctx, model, sampler, precision, samples, chain)
            ious = [iou(foreground_mask(img, colours=data.colours), hint_mask(s["hint"]).numpy())
                    for img, s in zip(images[name], samples, strict=True)]
            scores = accuracy(classify_batch(images[name], colours=data.colours, shapes=data.shapes), truth)
            summary[name] = {"iou": float(np.mean(ious)), **scores}
        w = summary["with"]
        summary["targets_met"] = bool(w["iou"] >= c.iou_target and w["colour"] >= c.colour_target
                                      and w["shape"] >= c.shape_target)
        for name in runs:
            s = summary[name]
            print(f"{name + ' ControlNet':<20} IoU {s['iou']:.3f}  colour {s['colour']:.1%}  "
                  f"background {s['background']:.1%}  shape {s['shape']:.1%}  all {s['all']:.1%}")
        if c.grid:
            summary["grid"] = self._grid(ctx, samples[:16], {k: v[:16] for k, v in images.items()})
        return summary

    def _grid(self, ctx: RunContext, samples: list[dict[str, Any]], images: dict[str, Tensor]) -> str:
        from t2i_engine.utils.images import make_grid, save_png

        assert self.config.grid is not None
        rows = [torch.stack([s["hint"] for s in samples]), *images.values()]
        tiles = torch.stack(rows, dim=1).flatten(0, 1)  # (16 * columns, 3, H, W): hint, with, without per sample
        path = str(Path(ctx.output_dir) / self.config.grid)
        save_png(make_grid(tiles, nrow=len(rows) * 4), path,
                 metadata={"prompts": "\n".join(s["caption"] for s in samples),
                           "columns": "hint | with ControlNet | without (repeated)"})
        return path
