"""Write the DreamBooth demo's five instance images (examples/dreambooth-plus/): the ``plus`` shape,
which the shipped shapes-64 model never saw, in five colour combinations of the plus dataset's
training split (``shapes = ["plus"]``, ``seed = 2``, ``heldout_fraction = 0.5``), so that the
held-out split (examples/dreambooth-eval-new.toml) prompts only combinations it was not shown.
Each image has its caption beside it, with "sks" for the shape.

    python plugins/dreambooth/scripts/make_demo_instances.py examples/dreambooth-plus
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from t2i_engine.data.shapes import COLOURS, ShapesDataset, render_shape
from t2i_engine.utils.images import save_png, to_pil

PICKED = (1, 3, 6, 9, 14)  # red/white, green/blue, blue/yellow, yellow/red, white/purple
SIZE, MIN_RADIUS, MAX_RADIUS = 64, 0.30, 0.40  # large: the shipped autoencoder keeps a big plus's corners


def main(out: Path) -> None:
    ds = ShapesDataset(shapes=["plus"], split="train", heldout_fraction=0.5, seed=2, size=SIZE)
    g = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for n, k in enumerate(PICKED):
        c, _, b = ds.combinations[k]
        u = torch.rand(3, generator=g).tolist()
        radius = SIZE * (MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * u[0])
        cx, cy = (radius + (SIZE - 2 * radius) * v for v in u[1:])
        image = render_shape("plus", COLOURS[ds.colours[c]], COLOURS[ds.colours[b]], size=SIZE, cx=cx, cy=cy,
                             radius=radius)
        (pil,) = to_pil(image[None])
        save_png(pil, str(out / f"{n}.png"))
        (out / f"{n}.txt").write_text(f"a {ds.colours[c]} sks on a {ds.colours[b]} background\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
