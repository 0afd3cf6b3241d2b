"""``edit-shapes-eval``: how well an InstructPix2Pix model edits procedural shapes, scored by the
deterministic pixel classifier of :mod:`t2i_engine.data.shapes_eval`.

For each of the first ``count`` samples of ``[data]`` (``type = "shapes-edit"``, normally
``split = "heldout"``: (source, instruction) combinations training never showed) the model edits
the source by the instruction, and the edit is read back into (colour, shape, background):

* **edit success**: the attribute the instruction names has the asked value;
* **preservation**: the two other attributes are the source's;
* **both**: the edit is exactly the target.

Reported for every ``image_guidance_scales`` value (s_I), at the ``[guidance] guidance_scale`` s_T.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["EditShapesEvalConfig", "EditShapesEvalTask", "edit_scores"]

_ge1 = attrs.validators.ge(1)


@attrs.frozen
class EditShapesEvalConfig:
    """``[task] name = "edit-shapes-eval"``; ``[data]`` (type = "shapes-edit") gives the edits."""

    count: int = option(default=240, validator=_ge1, help="edits scored: the first N samples of [data]")
    image_guidance_scales: list[float] = option(factory=lambda: [1.5], help="the s_I values scored, each in turn")
    batch_size: int = option(default=48, validator=_ge1, help="edits per sampler run")
    grid: str | None = option(default="edit-grid.png", help="sources above their edits, 16 per s_I (none: no grid)")
    success_target: float = option(default=0.9, help="target edit success")
    preservation_target: float = option(default=0.9, help="target preservation")


def edit_scores(predicted: Sequence[Any], samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Fractions of ``predicted`` labels (:class:`~t2i_engine.data.shapes_eval.ShapeLabels`) that
    show the asked attribute (``success``), keep the other two (``preservation``), or both."""
    if len(predicted) != len(samples) or not samples:
        raise ValueError(f"{len(predicted)} predictions for {len(samples)} edits")
    hits = {"success": 0, "preservation": 0, "both": 0}
    for p, s in zip(predicted, samples):
        got = (p.colour, p.shape, p.background)
        target = tuple(int(v) for v in s["target_labels"])
        k = int(s["kind"])
        success = got[k] == target[k]
        kept = all(got[i] == target[i] for i in range(3) if i != k)
        hits["success"] += success
        hits["preservation"] += kept
        hits["both"] += success and kept
    return {k: v / len(samples) for k, v in hits.items()}


class EditShapesEvalTask:
    """Edit held-out shape sources, classify the edits, print and return the scores per s_I."""

    Config = EditShapesEvalConfig

    def __init__(self, config: EditShapesEvalConfig) -> None:
        self.config = config

    def _edits(self, ctx: RunContext, model: Any, samples: list[dict[str, Any]], s_t: float, s_i: float,
               sampler: Any, precision: tuple[Any, torch.dtype]) -> Tensor:
        from t2i_engine.pipeline import seeded_noise
        from t2i_plugin_instructpix2pix.edit import edit_images

        autocast, dtype = precision
        f, c = model.autoencoder.downsample_factor, model.autoencoder.latent_channels
        out = []
        for start in range(0, len(samples), self.config.batch_size):
            chunk = samples[start:start + self.config.batch_size]
            sources = torch.stack([s["source"] for s in chunk]).to(dtype)
            side = sources.shape[-1] // f
            noise = seeded_noise([ctx.seed + start + i for i in range(len(chunk))], (c, side, side), dtype=dtype)
            with autocast:
                out.append(edit_images(model, [s["caption"] for s in chunk], sources, noise, sampler=sampler,
                                       text_scale=s_t, image_scale=s_i,
                                       generator=torch.Generator(device=ctx.device).manual_seed(ctx.seed + start)).float().cpu())
        return torch.cat(out)

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.shapes_eval import classify_batch
        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.tasks.common import build_model, inference_precision
        from t2i_engine.utils.images import make_grid, save_png
        from t2i_plugin_instructpix2pix.edit import check_edit_model
        from t2i_plugin_instructpix2pix.ema import choose_weights
        from t2i_plugin_instructpix2pix.shapes_edit import ShapesEditDataset

        c = self.config
        if ctx.config.data is None or ctx.config.sampler is None:
            raise ConfigError("edit-shapes-eval needs [data] (type = \"shapes-edit\", split = \"heldout\") and [sampler]")
        g = ctx.config.guidance or GuidanceConfig()
        if g.image_guidance_scale is not None:
            raise ConfigError("guidance.image_guidance_scale: edit-shapes-eval scores every value of "
                              "task.image_guidance_scales; set them there")
        data = ctx.plugins.build(ctx.config.data)
        if not isinstance(data, ShapesEditDataset):
            raise ConfigError(f"edit-shapes-eval: [data] type {ctx.config.data.name!r} is not 'shapes-edit'")
        model = build_model(ctx, task="edit-shapes-eval")
        choose_weights(model, ema=True)
        try:
            check_edit_model(model)
        except ValueError as exc:
            raise ConfigError(f"model.checkpoint: {exc}") from exc
        sampler = ctx.plugins.build(ctx.config.sampler)
        precision = inference_precision(ctx, model)
        samples = [data[i] for i in range(min(c.count, len(data)))]
        results: dict[str, dict[str, float]] = {}
        rows = []
        for s_i in c.image_guidance_scales:
            edits = self._edits(ctx, model, samples, g.guidance_scale, float(s_i), sampler, precision)
            results[f"s_I={s_i:g}"] = edit_scores(classify_batch(edits, colours=data.colours, shapes=data.shapes), samples)
            rows.append(edits[:16])
        print(f"{'s_I':<8}{'success':>10}{'preserved':>11}{'both':>8}   (s_T {g.guidance_scale:g}, {len(samples)} edits)")
        for name, r in results.items():
            print(f"{name[4:]:<8}{r['success']:>10.1%}{r['preservation']:>11.1%}{r['both']:>8.1%}")
        met = {n: r["success"] >= c.success_target and r["preservation"] >= c.preservation_target
               for n, r in results.items()}
        summary: dict[str, Any] = {"edits": len(samples), "guidance_scale": g.guidance_scale, **results,
                                   "targets_met": met}
        if c.grid:
            sources = torch.stack([s["source"] for s in samples[:16]])
            path = str(Path(ctx.output_dir) / c.grid)
            grid = make_grid(torch.cat([sources, *rows]), nrow=len(sources))
            save_png(grid, path, metadata={"instructions": "\n".join(s["caption"] for s in samples[:16]),
                                           "rows": "sources, then " + ", ".join(results)})
            summary["grid"] = path
        return summary
