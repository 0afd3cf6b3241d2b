"""Plain and kohya folder datasets: captions, repeats, and the errors for layouts that are neither."""

from __future__ import annotations

import fsspec
import pytest

from t2i_engine.errors import DataError
from t2i_plugin_dreambooth.dataset import captioned
from t2i_plugin_dreambooth.folders import expand_repeats, read_image_folder

from plugins.dreambooth.tests.conftest import write_image


def test_plain_folder_captions_from_sidecars_else_none(tmp_path):
    write_image(tmp_path / "a.png", caption="a sks on a blue background")
    write_image(tmp_path / "b.png", caption="kohya caption", ext=".caption")
    write_image(tmp_path / "c.png")
    (tmp_path / "notes.md").write_text("not an image")
    entries = read_image_folder(str(tmp_path), what="task.instance_data")
    assert [e.path.rsplit("/", 1)[-1] for e in entries] == ["a.png", "b.png", "c.png"]
    assert [e.caption for e in entries] == ["a sks on a blue background", "kohya caption", None]
    assert all(e.repeats == 1 for e in entries)
    filled = captioned(entries, "a sks", what="task.instance_data", key="instance_prompt")
    assert [e.caption for e in filled] == ["a sks on a blue background", "kohya caption", "a sks"]
    with pytest.raises(DataError, match=r"c\.png has no caption file.*instance_prompt"):
        captioned(entries, None, what="task.instance_data", key="instance_prompt")


def test_kohya_folders_repeat_and_caption_by_folder_name(tmp_path):
    write_image(tmp_path / "20_sks dog" / "0.png")
    write_image(tmp_path / "20_sks dog" / "1.png", caption="sks dog on a beach")
    write_image(tmp_path / "3_other" / "x.png")
    entries = read_image_folder(str(tmp_path), what="task.instance_data")
    assert [(e.path.rsplit("/", 2)[-2], e.caption, e.repeats) for e in entries] == [
        ("20_sks dog", "sks dog", 20), ("20_sks dog", "sks dog on a beach", 20), ("3_other", "other", 3)]
    epoch = expand_repeats(entries)
    assert len(epoch) == 20 + 20 + 3
    assert sum(e.caption == "other" for e in epoch) == 3


def test_kohya_reg_folder_as_class_data(tmp_path):
    write_image(tmp_path / "reg" / "1_dog" / "0.png")
    write_image(tmp_path / "reg" / "1_dog" / "1.png")
    entries = read_image_folder(str(tmp_path / "reg"), what="task.class_data")
    assert [(e.caption, e.repeats) for e in entries] == [("dog", 1), ("dog", 1)]


def test_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    write_image(tmp_path / "a.png", caption="a sks")
    fs.pipe("/db-inst/a.png", (tmp_path / "a.png").read_bytes())
    fs.pipe("/db-inst/a.txt", b"a sks\n")
    (entry,) = read_image_folder("memory://db-inst", what="task.instance_data")
    assert entry.caption == "a sks"


@pytest.mark.parametrize("layout, message", [
    ("mixed", "holds images and subfolders"),
    ("no-repeats", "subfolder 'dogs' .* is not named <repeats>_<name>"),
    ("zero-repeats", "repeats its images 0 times"),
    ("empty-sub", "subfolder '5_dog' .* has no images"),
    ("empty", "no images in"),
    ("file", "is not a folder"),
])
def test_bad_layouts_are_named(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "mixed":
        write_image(root / "a.png")
        write_image(root / "10_dog" / "b.png")
    elif layout == "no-repeats":
        write_image(root / "dogs" / "b.png")
    elif layout == "zero-repeats":
        write_image(root / "0_dog" / "b.png")
    elif layout == "empty-sub":
        (root / "5_dog").mkdir()
        (root / "5_dog" / "readme.txt").write_text("x")
    elif layout == "file":
        root = write_image(tmp_path / "x.png")
    with pytest.raises(DataError, match=message):
        read_image_folder(str(root), what="task.instance_data")
