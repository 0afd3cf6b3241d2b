"""The procedural edit triplets: the shapes classifier (an independent reader) sees the source's
labels in the source and the asked change, and only it, in the target; the held-out
(source, instruction) combinations never appear in training."""

from __future__ import annotations

import pytest

from t2i_engine.data.shapes import shape_mask
from t2i_engine.data.shapes_eval import classify
from t2i_plugin_instructpix2pix.shapes_edit import EDIT_KINDS, ShapesEditDataset
from t2i_plugin_instructpix2pix.shapes_eval import edit_scores


def test_targets_change_only_the_named_attribute():
    data = ShapesEditDataset(size=64, count=60, seed=3)
    kinds = set()
    for i in range(len(data)):
        s = data[i]
        src, tgt = classify(s["source"], colours=data.colours), classify(s["image"], colours=data.colours)
        assert (src.colour, src.shape, src.background) == tuple(s["source_labels"].tolist())
        assert (tgt.colour, tgt.shape, tgt.background) == tuple(s["target_labels"].tolist())
        k = s["kind"]
        kinds.add(EDIT_KINDS[k])
        changed = [j for j in range(3) if s["source_labels"][j] != s["target_labels"][j]]
        assert changed == [k] and int(s["target_labels"][k]) == s["value"]
        # same place and size: the target's shape covers the pixels the source's shape covers
        sh = data.shapes[int(s["target_labels"][1])]
        mask = shape_mask(sh, size=64, cx=s["cx"], cy=s["cy"], radius=s["radius"])
        bg = (s["image"] == data.render((0, 0, int(s["target_labels"][2])), cx=-99, cy=-99, radius=1)).all(0)
        assert (~bg == mask).all()  # the shape's colour is never its background's
    assert kinds == set(EDIT_KINDS)


def test_instructions():
    data = ShapesEditDataset(size=32, count=300, seed=0)
    captions = {data[i]["caption"] for i in range(300)}
    assert any(c.startswith("make the circle ") for c in captions)
    assert any(c.startswith("turn the square into a ") for c in captions)
    assert "make the background white" in captions


def test_heldout_combinations_are_disjoint():
    full = ShapesEditDataset(count=10, heldout_fraction=0.1, split="all")
    train = ShapesEditDataset(count=10, heldout_fraction=0.1, split="train")
    held = ShapesEditDataset(count=10, heldout_fraction=0.1, split="heldout")
    assert len(full.edits) == 6 * 3 * 5 * (4 + 2 + 4)  # sources x (colours, shapes, backgrounds) asked
    assert not set(train.edits) & set(held.edits)
    assert set(train.edits) | set(held.edits) == set(full.edits)
    assert len(held.edits) == 90
    assert {held[i]["caption"] for i in range(10)} <= {held.instruction(e) for e in held.edits}
    with pytest.raises(ValueError, match="empty"):
        ShapesEditDataset(split="heldout")


def test_edit_scores_by_hand():
    from t2i_engine.data.shapes_eval import ShapeLabels

    samples = [{"kind": 0, "target_labels": (2, 1, 3)}, {"kind": 2, "target_labels": (2, 1, 3)}]
    got = [ShapeLabels(2, 0, 3), ShapeLabels(2, 1, 4)]  # colour right, shape lost; background wrong, rest kept
    assert edit_scores(got, samples) == {"success": 0.5, "preservation": 0.5, "both": 0.0}
