"""The shapes pixel classifier against the dataset's own labels (independent truth)."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.data.shapes import ShapesDataset
from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify, classify_batch, format_table


def _truth(sample: dict) -> ShapeLabels:
    return ShapeLabels(sample["colour_label"], sample["shape_label"], sample["background_label"])


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_are_read_exactly(size: int) -> None:
    ds = ShapesDataset(size=size, count=150, colours=["red", "green", "blue", "yellow", "purple", "white",
                                                     "black", "orange", "cyan", "pink"], seed=3)
    samples = [ds[i] for i in range(len(ds))]
    predicted = classify_batch(torch.stack([s["image"] for s in samples]), colours=ds.colours, shapes=ds.shapes)
    scores = accuracy(predicted, [_truth(s) for s in samples])
    assert scores == {"colour": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}


def test_noisy_renders_are_read_exactly() -> None:
    ds = ShapesDataset(size=64, count=60, seed=1)
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        noisy = (s["image"] + 0.15 * torch.randn(s["image"].shape, generator=g)).clamp(-1, 1)
        assert classify(noisy, colours=ds.colours, shapes=ds.shapes) == _truth(s)


def test_flat_image_has_no_shape() -> None:
    image = torch.full((3, 32, 32), -1.0)  # black
    out = classify(image, colours=["red", "black"])
    assert out == ShapeLabels(-1, -1, 1)


def test_accuracy_counts_each_field_and_table_lists_them() -> None:
    truth = [ShapeLabels(0, 1, 2), ShapeLabels(1, 2, 0)]
    pred = [ShapeLabels(0, 1, 2), ShapeLabels(1, 0, 0)]
    scores = accuracy(pred, truth)
    assert scores == {"colour": 1.0, "background": 1.0, "shape": 0.5, "all": 0.5}
    table = format_table(scores, count=2, targets={"shape": 0.9})
    assert "shape" in table and "50.0%" in table and "90%" in table
    with pytest.raises(ValueError):
        accuracy(pred, truth[:1])


def test_largest_component_matches_scipy() -> None:
    """The torch connected-component labelling against scipy.ndimage.label (the reference)."""
    import numpy as np
    from scipy import ndimage

    from t2i_engine.data.shapes_eval import _largest_component

    rng = np.random.default_rng(0)
    for density in (0.3, 0.45, 0.55, 0.7):
        for _ in range(10):
            mask = rng.random((24, 20)) < density
            labelled, n = ndimage.label(mask)
            expected = mask if n <= 1 else labelled == 1 + int(np.bincount(labelled.ravel())[1:].argmax())
            assert np.array_equal(_largest_component(mask), expected)
    assert not _largest_component(np.zeros((5, 5), dtype=bool)).any()


def test_foreground_mask_is_where_the_shape_was_drawn() -> None:
    from t2i_engine.data.shapes import shape_mask
    from t2i_engine.data.shapes_eval import foreground_mask

    ds = ShapesDataset(size=64, count=40, seed=5)
    for i in range(len(ds)):
        s = ds[i]
        truth = shape_mask(ds.shapes[s["shape_label"]], size=64, cx=s["cx"], cy=s["cy"], radius=s["radius"])
        assert (foreground_mask(s["image"], colours=ds.colours) == truth.numpy()).all()
    assert not foreground_mask(torch.full((3, 16, 16), -1.0), colours=["red", "black"]).any()


def test_every_shape_at_random_sizes_and_places_is_detected() -> None:
    """The detector test of the extra shapes: circle, square, triangle, plus and star rendered at
    random radii and centres (and with noise) are each classified as themselves among all five.
    (A star's points need a radius of about 8 pixels: its radius starts there.)"""
    from t2i_engine.data.shapes import ALL_SHAPES, COLOURS, render_shape

    g = torch.Generator().manual_seed(7)
    colours = ["red", "green", "blue", "yellow", "purple", "white"]
    for size in (32, 64):
        for k, shape in enumerate(ALL_SHAPES):
            for _ in range(12):
                u = torch.rand(5, generator=g).tolist()
                low = 8.0 / size if shape == "star" else 0.18
                radius = size * (low + (0.35 - low) * u[0])
                cx, cy = radius + (size - 2 * radius) * u[1], radius + (size - 2 * radius) * u[2]
                fg, bg = int(u[3] * 6), (int(u[3] * 6) + 1 + int(u[4] * 5)) % 6
                image = render_shape(shape, COLOURS[colours[fg]], COLOURS[colours[bg]], size=size, cx=cx, cy=cy,
                                     radius=radius)
                image = (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(-1, 1)
                assert classify(image, colours=colours, shapes=ALL_SHAPES) == ShapeLabels(fg, k, bg), (shape, size)


def test_shape_bounds_are_the_bounding_boxes_of_large_renders() -> None:
    """``shape_bounds`` (what the classifier fits) against the rendered masks' own extent."""
    from t2i_engine.data.shapes import ALL_SHAPES, shape_bounds, shape_mask

    size, radius = 400, 150.0
    for shape in ALL_SHAPES:
        ys, xs = torch.nonzero(shape_mask(shape, size=size, cx=200.0, cy=200.0, radius=radius), as_tuple=True)
        left, top, right, bottom = shape_bounds(shape)
        measured = ((xs.min() - 200) / radius, (ys.min() - 200) / radius, (xs.max() + 1 - 200) / radius,
                    (ys.max() + 1 - 200) / radius)
        # 3.5 px: a star's sharp tips lose about 2 px of pixel centres
        assert all(abs(float(m) - b) <= 3.5 / radius for m, b in zip(measured, (left, top, right, bottom))), shape


def test_extra_shapes_stay_out_of_the_default_dataset() -> None:
    """The shipped shapes-64 model was trained on the default list: it must stay the three."""
    from t2i_engine.data.shapes import EXTRA_SHAPES, SHAPES

    assert ShapesDataset().shapes == list(SHAPES) == ["circle", "square", "triangle"]
    assert {"plus", "star"} <= set(EXTRA_SHAPES) and not set(EXTRA_SHAPES) & set(SHAPES)
    ds = ShapesDataset(size=32, count=4, shapes=["plus"], colours=["red", "blue"])
    assert ds[0]["caption"] in ("a red plus on a blue background", "a blue plus on a red background")
    assert ds.caption_of(0, 0, 1, words={"plus": "sks"}) == "a red sks on a blue background"
    with pytest.raises(ValueError, match="hexagon"):
        ShapesDataset(shapes=["hexagon"])
