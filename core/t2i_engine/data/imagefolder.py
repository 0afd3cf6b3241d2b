"""Image + caption folders over fsspec: HF ``imagefolder`` layout or ``.txt`` sidecars.

With a ``metadata.jsonl`` (one JSON object per line, ``file_name`` relative to the file's own
folder and a caption column), captions come from it; extra columns named in ``paired_columns``
name further images of the sample (a ControlNet hint, an edited image) that are transformed
with the same crop and flip. Without metadata, each image's caption is the ``.txt`` file of the
same stem beside it. A sample that fails to decode is skipped (the next one is served in its
place), counted once (:class:`~t2i_engine.data.bad_samples.BadSamples`), and logged.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import fsspec
from torch.utils.data import Dataset

from t2i_engine.config.fields import existing_path, option
from t2i_engine.data.bad_samples import BadSamples
from t2i_engine.data.common import IMAGE_EXTENSIONS, TransformOptions, decode_image, sample_generator
from t2i_engine.errors import DataError

__all__ = ["ImageFolderDataset"]


@attrs.frozen(kw_only=True)
class ImageFolderConfig(TransformOptions):
    """Keys of ``[data]`` with ``type = "imagefolder"``."""

    root: str = existing_path(kind="dir", help="folder path or fsspec URL (file://, memory://, s3:// ...)")
    caption_column: str = option(default="text", help="metadata.jsonl column holding the caption")
    paired_columns: list[str] = option(factory=list,
                                       help="metadata.jsonl columns naming paired images")


class ImageFolderDataset(Dataset):
    """Map-style dataset of ``{"image", "caption", "index", <paired columns>}`` samples."""

    Config = ImageFolderConfig

    def __init__(self, config: ImageFolderConfig) -> None:
        self.config = config
        self.fs, root = fsspec.core.url_to_fs(config.root)
        self.root = root.rstrip("/")
        self.items = self._index()
        if not self.items:
            raise DataError(f"{config.root}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
        self.transform = config.transform()
        self.bad_samples = BadSamples(min_seen=min(32, len(self.items)))
        self._known_bad: set[int] = set()  # indices that failed in this process

    def _index(self) -> list[dict[str, Any]]:
        files = sorted(self.fs.find(self.root))
        metadata = [f for f in files if f.rsplit("/", 1)[-1] == "metadata.jsonl"]
        items: list[dict[str, Any]] = []
        if metadata:
            for meta in metadata:
                base = meta.rsplit("/", 1)[0]
                with self.fs.open(meta, "rt") as f:
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        row = json.loads(line)
                        if "file_name" not in row or self.config.caption_column not in row:
                            raise DataError(f"{meta}:{n}: needs 'file_name' and "
                                            f"'{self.config.caption_column}'")
                        items.append({"path": f"{base}/{row['file_name']}",
                                      "caption": str(row[self.config.caption_column]),
                                      "paired": {c: f"{base}/{row[c]}" for c in self.config.paired_columns}})
            return items
        present = set(files)
        for f in files:
            stem, _, ext = f.rpartition(".")
            if ext.lower() in IMAGE_EXTENSIONS:
                txt = f"{stem}.txt"
                caption = ""
                if txt in present:
                    with self.fs.open(txt, "rt") as fh:
                        caption = fh.read().strip()
                items.append({"path": f, "caption": caption, "paired": {}})
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        images = {"image": decode_image(self.fs.cat_file(item["path"]))}
        for column, path in item["paired"].items():
            images[column] = decode_image(self.fs.cat_file(path))
        out: dict[str, Any] = self.transform(images, generator=sample_generator(self.config.seed, item["path"]))
        return {**out, "caption": item["caption"], "index": index}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            if i in self._known_bad:  # counted when it failed; do not decode (or count) it again
                continue
            try:
                sample = self._load(i)
            except DataError:
                raise
            except Exception as e:  # undecodable, truncated, missing: skip to the next one
                self._known_bad.add(i)
                self.bad_samples.failed(self.items[i]["path"], e)
                continue
            self.bad_samples.ok(self.items[i]["path"])
            return self.bad_samples.attach(sample)
        raise DataError(f"{self.config.root}: no sample could be decoded; first bad: "
                        f"{'; '.join(self.bad_samples.first_bad)}")
