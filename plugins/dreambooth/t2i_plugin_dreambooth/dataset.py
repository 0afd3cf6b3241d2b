"""The DreamBooth dataset: each sample pairs an instance image with a class image.

As diffusers' ``train_dreambooth.py`` pairs them: an epoch is ``max(instances, classes)``
samples (kohya repeats counted), sample ``i`` holds instance ``i mod instances`` and class
``i mod classes``. Collated, a batch of ``B`` samples is ``B`` instance images with their captions
and, with prior preservation, ``B`` class images with theirs: the loss takes both halves
(:class:`~t2i_plugin_dreambooth.trainable.DreamBoothTrainable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fsspec
from torch.utils.data import Dataset

from t2i_engine.data.common import decode_image, sample_generator
from t2i_engine.data.transforms import PairedTransform
from t2i_engine.errors import DataError
from t2i_plugin_dreambooth.folders import ImageEntry, expand_repeats

__all__ = ["DreamBoothDataset", "captioned"]


def captioned(entries: Sequence[ImageEntry], prompt: str | None, *, what: str, key: str) -> list[ImageEntry]:
    """``entries`` with every missing caption set to ``prompt``; an image left without one is a
    DataError naming it and the job key that would give it (``key``)."""
    out = []
    for e in entries:
        caption = e.caption if e.caption is not None else prompt
        if caption is None:
            raise DataError(f"{what}: {e.path} has no caption file (.txt/.caption) and {key} is not set")
        out.append(ImageEntry(e.path, caption, e.repeats))
    return out


class DreamBoothDataset(Dataset):
    """Map-style dataset of ``{"image", "caption"}`` samples, plus ``{"class_image",
    "class_caption"}`` when class images are given. Images go through ``transform`` (resize,
    crop, flip) with a generator fixed per image path and ``seed``."""

    def __init__(self, instances: Sequence[ImageEntry], classes: Sequence[ImageEntry] | None = None, *,
                 transform: PairedTransform, seed: int = 0) -> None:
        self.instances = expand_repeats(instances)
        self.classes = expand_repeats(classes) if classes else []
        for e in [*self.instances, *self.classes]:
            if e.caption is None:
                raise DataError(f"{e.path}: no caption (give it a .txt file or set the job's prompt)")
        if not self.instances:
            raise DataError("DreamBooth needs at least one instance image")
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def _image(self, entry: ImageEntry) -> Any:
        fs, path = fsspec.core.url_to_fs(entry.path)
        try:
            image = decode_image(fs.cat_file(path))
        except Exception as e:  # a broken file among 5 instance images is never something to skip
            raise DataError(f"{entry.path}: cannot read the image ({e})") from e
        return self.transform({"image": image}, generator=sample_generator(self.seed, entry.path))["image"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        inst = self.instances[index % len(self.instances)]
        sample = {"image": self._image(inst), "caption": inst.caption}
        if self.classes:
            cls = self.classes[index % len(self.classes)]
            sample |= {"class_image": self._image(cls), "class_caption": cls.caption}
        return sample
