"""Edit-triplet datasets: (source image, instruction, edited image) for InstructPix2Pix training.

A sample is ``{"source": (3, r, r), "image": (3, r, r), "caption": str, "key": str}`` in [-1, 1]
(``image`` is the edited target, ``caption`` the instruction), source and target cut with the
same resize, crop and flip (:class:`~t2i_engine.data.transforms.PairedTransform`, drawn once per
sample from ``(seed, key)``).

* ``ip2p-folder``: the reference layout (``dataset_creation/prepare_dataset.py``, read by
  ``edit_dataset.py``): ``<root>/seeds.json`` = ``[[prompt_dir, [seed, ...]], ...]``;
  ``<root>/<prompt_dir>/prompt.json`` holds ``{"edit": instruction, ...}`` and each seed has
  ``<seed>_0.jpg`` (source) and ``<seed>_1.jpg`` (edited). The prompt folders are split by their
  order in seeds.json (train 0.9 / val 0.05 / test 0.05 by default, as the reference).
* ``ip2p-webdataset``: WebDataset tar shards whose samples carry the source, instruction and
  edited image as columns (``<key>.input.jpg``, ``<key>.edit.txt``, ``<key>.output.jpg`` by default).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import attrs
import fsspec
from attrs.validators import ge, in_
from torch.utils.data import Dataset

from t2i_engine.config.fields import existing_path, option
from t2i_engine.data.bad_samples import BadSamples
from t2i_engine.data.common import TransformOptions, decode_image, sample_generator
from t2i_engine.data.webdataset import WebDatasetShards
from t2i_engine.errors import DataError

__all__ = ["EditFolderDataset", "EditWebDataset"]

_SPLITS = ("train", "val", "test", "all")


def _fractions(_inst: Any, attribute: attrs.Attribute, value: list[float]) -> None:
    if len(value) != 3 or any(v < 0 for v in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError(f"{attribute.name} must be three fractions (train, val, test) summing to 1, got {value!r}")


@attrs.frozen(kw_only=True)
class EditFolderConfig(TransformOptions):
    """Keys of ``[data]`` with ``type = "ip2p-folder"``."""

    root: str = existing_path(kind="dir", help="folder (or fsspec URL) holding seeds.json")
    split: Literal["train", "val", "test", "all"] = option(default="train", validator=in_(_SPLITS),
                                                          help="which part of seeds.json (split by order)")
    splits: list[float] = option(factory=lambda: [0.9, 0.05, 0.05], validator=_fractions,
                                 help="fractions of the prompt folders in train, val, test")
    extension: str = option(default="jpg", help="extension of the <seed>_0 / <seed>_1 images")


class EditFolderDataset(Dataset):
    """Map-style edit triplets in the reference's seeds.json layout; one sample per (prompt
    folder, seed) pair. A pair that fails to read is skipped (the next is served), counted and logged."""

    Config = EditFolderConfig

    def __init__(self, config: EditFolderConfig) -> None:
        self.config = config
        self.fs, root = fsspec.core.url_to_fs(config.root)
        self.root = root.rstrip("/")
        self.items = self._index()
        if not self.items:
            raise DataError(f"{config.root}: split {config.split!r} of seeds.json holds no (prompt, seed) pair")
        self.transform = config.transform()
        self.bad_samples = BadSamples(min_seen=min(32, len(self.items)))
        self._instructions: dict[str, str] = {}

    def _index(self) -> list[tuple[str, str]]:
        path = f"{self.root}/seeds.json"
        try:
            with self.fs.open(path, "rt") as f:
                seeds = json.load(f)
        except FileNotFoundError as e:
            raise DataError(f"{self.config.root}: no seeds.json (the InstructPix2Pix dataset layout)") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e})") from e
        if not isinstance(seeds, list) or not all(isinstance(s, list) and len(s) == 2 and isinstance(s[1], list)
                                                  for s in seeds):
            raise DataError(f"{path}: expected [[prompt_dir, [seed, ...]], ...]")
        if self.config.split != "all":
            t, v, _ = self.config.splits
            lo, hi = {"train": (0.0, t), "val": (t, t + v), "test": (t + v, 1.0)}[self.config.split]
            seeds = seeds[math.floor(lo * len(seeds)):math.floor(hi * len(seeds))]  # as edit_dataset.py
        return [(str(name), str(seed)) for name, group in seeds for seed in group]

    def __len__(self) -> int:
        return len(self.items)

    def _instruction(self, name: str) -> str:
        if name not in self._instructions:
            path = f"{self.root}/{name}/prompt.json"
            with self.fs.open(path, "rt") as f:
                prompt = json.load(f)
            if "edit" not in prompt:
                raise DataError(f"{path}: no 'edit' instruction (has {', '.join(sorted(prompt))})")
            self._instructions[name] = str(prompt["edit"])
        return self._instructions[name]

    def _load(self, index: int) -> dict[str, Any]:
        name, seed = self.items[index]
        base, ext = f"{self.root}/{name}/{seed}", self.config.extension
        images = {"source": decode_image(self.fs.cat_file(f"{base}_0.{ext}")),
                  "image": decode_image(self.fs.cat_file(f"{base}_1.{ext}"))}
        key = f"{name}/{seed}"
        out: dict[str, Any] = self.transform(images, generator=sample_generator(self.config.seed, key))
        return {**out, "caption": self._instruction(name), "key": key}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            key = "/".join(self.items[i])
            try:
                sample = self._load(i)
            except DataError:
                raise
            except Exception as e:  # unreadable or missing image: skip to the next pair
                self.bad_samples.failed(key, e)
                continue
            self.bad_samples.ok(key)
            return self.bad_samples.attach(sample)
        raise DataError(f"{self.config.root}: no (prompt, seed) pair could be read; first bad: "
                        f"{'; '.join(self.bad_samples.first_bad)}")


def _image_columns(name: str) -> list[str]:
    return [f"{name}.{ext}" for ext in ("jpg", "jpeg", "png", "webp")] + [name]


@attrs.frozen(kw_only=True)
class EditWebDatasetConfig(TransformOptions):
    """Keys of ``[data]`` with ``type = "ip2p-webdataset"``."""

    urls: list[str] = option(help="shard URLs; each may use brace expansion {000..099}")
    input_keys: list[str] = option(factory=lambda: _image_columns("input"),
                                   help="member extensions tried for the source image, in order")
    edit_keys: list[str] = option(factory=lambda: ["edit.txt", "edit"],
                                  help="member extensions tried for the instruction, in order")
    output_keys: list[str] = option(factory=lambda: _image_columns("output"),
                                    help="member extensions tried for the edited image, in order")
    shuffle_shards: bool = option(default=True, help="shuffle the shard order every epoch")
    resample: bool = option(default=False, help="draw shards with replacement, endlessly")
    shuffle_buffer: int = option(default=0, validator=ge(0), help="sample shuffle buffer (0: off)")


class EditWebDataset(WebDatasetShards):
    """Edit triplets from WebDataset shards (sharding by rank and worker, shuffling, skipped
    corrupt samples: the core :class:`~t2i_engine.data.webdataset.WebDatasetShards`)."""

    Config = EditWebDatasetConfig

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        def first(keys: list[str], what: str) -> bytes:
            for k in keys:
                if k in raw:
                    return raw[k]
            raise KeyError(f"no {what} (looked for {', '.join(keys)}; has {', '.join(sorted(raw))})")

        c = self.config
        key = f"{raw.get('__url__', '')}#{raw['__key__']}"
        images = {"source": decode_image(first(c.input_keys, "source image")),
                  "image": decode_image(first(c.output_keys, "edited image"))}
        caption = first(c.edit_keys, "instruction").decode("utf-8").strip()
        out: dict[str, Any] = self.transform(images, generator=sample_generator(c.seed, key))
        return {**out, "caption": caption, "key": key}
