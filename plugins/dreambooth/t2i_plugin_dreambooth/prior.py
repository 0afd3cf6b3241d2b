"""Class images for prior preservation, sampled by the engine's own sampler from the foundation
model and cached under content-hash names.

Class image ``i`` is the model's sample for prompt ``prompts[i % len(prompts)]`` from seed
``seed + i``. Its file name is a hash of everything that decides its pixels (the model's weights
and ``[model]``/``[schedule]`` tables, the sampler and its options, guidance, precision, size, the
prompt, the seed and ``i``), so a re-run finds the images it can reuse, generates only the missing
ones, and never reuses an image that another model or setting made. Each PNG has a ``.txt``
caption beside it: the cache folder is itself a plain DreamBooth (or imagefolder) dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from t2i_plugin_dreambooth.folders import ImageEntry

__all__ = ["ClassImageSpec", "class_image_names", "ensure_class_images", "model_fingerprint"]


def _plain(value: Any) -> Any:
    """A JSON-ready form of a config object (attrs classes by their fields)."""
    if attrs.has(type(value)):
        return {"__type__": type(value).__name__, **{k: _plain(v) for k, v in attrs.asdict(value, recurse=False).items()}}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def model_fingerprint(model: Any, *, tables: Mapping[str, Any] = {}) -> str:
    """SHA-256 of a model bundle's weights (every tensor of every ``nn.Module`` part, by name,
    dtype, shape and bytes) and of the job ``tables`` that shape it without being weights
    (``[model]`` options such as attention heads, ``[schedule]``)."""
    h = hashlib.sha256()
    modules = {"": model} if isinstance(model, nn.Module) else {
        name: getattr(model, name) for name in ("text_encoder", "autoencoder", "denoiser")
        if isinstance(getattr(model, name, None), nn.Module)}
    for prefix, module in modules.items():
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{prefix}{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(_plain(dict(tables)), sort_keys=True).encode())
    return h.hexdigest()


@attrs.frozen
class ClassImageSpec:
    """What decides the class images: one spec, many images."""

    model: str  # model_fingerprint()
    sampler: Any  # the [sampler] name and options
    guidance: Any  # the [guidance] options
    precision: str  # engine.precision (what sampling ran in)
    size: int  # image side in pixels
    prompts: tuple[str, ...]  # image i takes prompts[i % len]
    seed: int  # image i starts from seed + i

    def prompt(self, index: int) -> str:
        """The prompt of image ``index``."""
        return self.prompts[index % len(self.prompts)]

    def name(self, index: int) -> str:
        """The file name (without extension) of image ``index``: ``class-<24 hex digits>``."""
        settings = {"model": self.model, "sampler": _plain(self.sampler), "guidance": _plain(self.guidance),
                    "precision": self.precision, "size": self.size, "prompt": self.prompt(index),
                    "seed": self.seed + index, "index": index}
        return "class-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def class_image_names(spec: ClassImageSpec, count: int) -> list[str]:
    """The file names (``.png``) of the first ``count`` class images."""
    return [spec.name(i) + ".png" for i in range(count)]


Generate = Callable[[Sequence[str], Sequence[int]], torch.Tensor]
"""``(prompts, seeds) -> images (N, 3, H, W) in [-1, 1]``: the run's sampler over its model."""


def ensure_class_images(folder: str | Path, spec: ClassImageSpec, count: int, *, generate: Generate,
                        batch_size: int) -> tuple[list[ImageEntry], int]:
    """The ``count`` class images of ``spec`` in ``folder``, generating only those missing.

    Returns ``(entries, generated)``: the images (paths and prompts) in index order and how many
    were sampled now. Images are written one by one (PNG, then its ``.txt``), so an interrupted
    run keeps what it made.
    """
    from t2i_engine.utils.images import save_png, to_pil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = class_image_names(spec, count)
    missing = [i for i, n in enumerate(names) if not (folder / n).is_file() or not (folder / n).with_suffix(".txt").is_file()]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        images = generate([spec.prompt(i) for i in chunk], [spec.seed + i for i in chunk])
        for i, image in zip(chunk, to_pil(images)):
            path = folder / names[i]
            tmp = path.with_name(f".{path.name}.partial")
            save_png(image, str(tmp), metadata={"prompt": spec.prompt(i), "seed": str(spec.seed + i)})
            tmp.rename(path)
            path.with_suffix(".txt").write_text(spec.prompt(i) + "\n", encoding="utf-8")
    entries = [ImageEntry(str(folder / n), spec.prompt(i)) for i, n in enumerate(names)]
    return entries, len(missing)
