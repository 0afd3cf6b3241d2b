"""Image folders of a DreamBooth run: plain folders and kohya-ss folder datasets.

Two layouts are read, for the instance images and the class (regularisation) images alike:

* **plain**: images directly in the folder; an image's caption is the ``.txt`` (or kohya's
  ``.caption``) file of the same stem beside it, else the prompt the job gives
  (``instance_prompt`` / ``class_prompt``); every image is used once per epoch.
* **kohya** (kohya-ss ``train_network.py`` / ``train_db.py`` with ``--train_data_dir`` and
  ``--reg_data_dir``): no images at the top level, only subfolders named ``<repeats>_<name>``
  (``20_sks dog``, ``1_dog``); each image of such a folder counts ``repeats`` times per epoch,
  and its caption is its own ``.txt``/``.caption`` file, else ``<name>`` (kohya's "class
  tokens"), else the job's prompt.

Paths may be fsspec URLs. Anything else (a top level mixing images and subfolders, a subfolder
without a repeat count, no image at all) is a :class:`~t2i_engine.errors.DataError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs
import fsspec

from t2i_engine.data.common import IMAGE_EXTENSIONS
from t2i_engine.errors import DataError

__all__ = ["CAPTION_EXTENSIONS", "ImageEntry", "expand_repeats", "read_image_folder"]

CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
"""Sidecar caption files, in the order they are looked for (kohya's ``--caption_extension``)."""

_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@attrs.frozen
class ImageEntry:
    """One image of a folder: where it is, its caption (None: the job's prompt applies) and how
    many times it counts per epoch."""

    path: str
    caption: str | None
    repeats: int = 1


def _is_image(path: str) -> bool:
    return path.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def _sidecar_caption(fs: fsspec.AbstractFileSystem, image: str, present: set[str]) -> str | None:
    stem = image.rpartition(".")[0]
    for ext in CAPTION_EXTENSIONS:
        if stem + ext in present:
            with fs.open(stem + ext, "rt", encoding="utf-8") as f:
                return f.read().strip()
    return None


def _images_in(fs: fsspec.AbstractFileSystem, folder: str, *, repeats: int, default: str | None) -> list[ImageEntry]:
    files = sorted(fs.ls(folder, detail=False))
    present = set(files)
    return [ImageEntry(f, _sidecar_caption(fs, f, present) or default, repeats) for f in files if _is_image(f)]


def read_image_folder(url: str, *, what: str) -> list[ImageEntry]:
    """The images of a plain or kohya folder (see the module docstring), sorted by path.

    ``what`` names the job key in error messages (``"task.instance_data"``).
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise DataError(f"{what}: {url} is not a folder")
    entries = sorted(fs.ls(root, detail=True), key=lambda e: e["name"])
    folders = [e["name"] for e in entries if e["type"] == "directory"]
    top = _images_in(fs, root, repeats=1, default=None)
    if top and folders:
        raise DataError(f"{what}: {url} holds images and subfolders ({folders[0].rsplit('/', 1)[-1]}); use "
                        "either a plain folder of images or kohya's <repeats>_<name> subfolders only")
    if top:
        return top
    images: list[ImageEntry] = []
    for folder in folders:
        name = folder.rsplit("/", 1)[-1]
        match = _KOHYA_FOLDER.match(name)
        if match is None:
            raise DataError(f"{what}: subfolder '{name}' of {url} is not named <repeats>_<name> (e.g. '20_sks dog'), "
                            "as kohya folder datasets are")
        repeats, caption = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            raise DataError(f"{what}: subfolder '{name}' of {url} repeats its images {repeats} times; use 1 or more")
        found = _images_in(fs, folder, repeats=repeats, default=caption)
        if not found:
            raise DataError(f"{what}: subfolder '{name}' of {url} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        images += found
    if not images:
        raise DataError(f"{what}: no images in {url} ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def expand_repeats(entries: Sequence[ImageEntry]) -> list[ImageEntry]:
    """Each entry ``repeats`` times, in order: one epoch of a kohya dataset."""
    return [e for e in entries for _ in range(e.repeats)]
