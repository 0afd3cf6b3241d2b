"""Has an Imagen stage learnt the shapes? Its x0 estimate at the noise levels where a shape is
decided, read by the shapes data's pixel classifier (docs/imagen.md "How the base learnt the
shapes").

Noises ``--count`` *training* images (samples ``--first`` ... of the train split, so no held-out
prompt is touched) at each sigma, takes the stage's x0 estimate with the true caption and reports
the x0 mean squared error and how often the classifier reads the true shape, colour and
background from it. The noise is seeded, so two stages are compared on the same draws.

    python benchmarks/imagen_x0_probe.py examples/models/imagen-shapes-base.safetensors
    python benchmarks/imagen_x0_probe.py run/ema-step-2500.safetensors --sigmas 2 4 8 --count 96
"""

from __future__ import annotations

import argparse

import torch

from t2i_engine.data.shapes import ShapesDataset
from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify_batch
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.pipeline import encode_prompts
from t2i_plugin_imagen.stage import load_imagen_stage


def probe(path: str, *, sigmas: list[float], first: int, count: int, seed: int) -> list[dict[str, float]]:
    """Per sigma: x0 MSE and the fractions read right (``colour``, ``background``, ``shape``, ``all``)."""
    stage = load_imagen_stage(path).eval()
    if stage.lowres_size is not None:
        raise SystemExit(f"{path}: {stage.description} is a super-resolution stage; probe a base stage")
    data = ShapesDataset(size=stage.image_size, split="train", heldout_fraction=0.15, count=first + count)
    items = [data[i] for i in range(first, first + count)]
    images = torch.stack([it["image"] for it in items])
    truth = [ShapeLabels(it["colour_label"], it["shape_label"], it["background_label"]) for it in items]
    cond, _ = encode_prompts(stage.text_encoder, [it["caption"] for it in items])
    denoiser = DenoiserWrapper(stage.unet, stage.schedule)
    rows = []
    with torch.no_grad():
        for sigma in sigmas:
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
            s = torch.full((count,), float(sigma))
            x0 = denoiser(images + sigma * noise, s, cond).clamp(-1, 1)
            read = accuracy(classify_batch(x0, colours=data.colours, shapes=data.shapes), truth)
            rows.append({"sigma": sigma, "mse": float(((x0 - images) ** 2).mean()), **read})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", help="Imagen base stage files (.safetensors of this plugin)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--first", type=int, default=99000, help="first train-split sample index")
    parser.add_argument("--count", type=int, default=96, help="images per sigma")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed")
    args = parser.parse_args()
    print("| stage | sigma | x0 MSE | shape | colour | background |")
    print("|---|---|---|---|---|---|")
    for path in args.stages:
        for r in probe(path, sigmas=args.sigmas, first=args.first, count=args.count, seed=args.seed):
            print(f"| {path} | {r['sigma']:g} | {r['mse']:.3f} | {r['shape']:.0%} | {r['colour']:.0%} | "
                  f"{r['background']:.0%} |")


if __name__ == "__main__":
    main()
