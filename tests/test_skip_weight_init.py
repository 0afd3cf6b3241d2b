"""skip_weight_init(): no torch.nn.init draws while building a module a strict load replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t2i_engine.nn.init import skip_weight_init
from tests.helpers import count_draws


def test_layers_built_inside_draw_nothing_and_the_functions_come_back(monkeypatch):
    calls = count_draws(monkeypatch)
    nn.Linear(3, 4), nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 4), nn.Embedding(5, 2)
    drawn = len(calls)
    assert drawn >= 7  # the layers do draw through torch.nn.init (else this test proves nothing)
    with skip_weight_init():
        nn.Linear(3, 4), nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 4), nn.Embedding(5, 2)
    assert len(calls) == drawn
    with pytest.raises(RuntimeError), skip_weight_init():
        raise RuntimeError("a failed build")
    nn.Linear(3, 4)
    assert len(calls) == drawn + 2  # restored, also after an exception


def test_stable_diffusion_from_weights_draws_nothing_and_equals_its_source(monkeypatch):
    """Loading a checkpoint builds the model without drawing its weights; the loaded model holds
    exactly the source's tensors and buffers (a strict load left nothing uninitialised)."""
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    source = build_model(None, PRESETS["tiny"], seed=3)
    calls = count_draws(monkeypatch)
    loaded = build_model(source.weights(), PRESETS["tiny"])
    assert calls == []
    want, got = dict(source.named_buffers()), dict(loaded.named_buffers())  # non-persistent ones too
    want.update(source.state_dict())
    got.update(loaded.state_dict())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_another_thread_still_draws_while_one_skips() -> None:
    """The swap is per thread: a thread that builds layers while another loads a checkpoint under
    skip_weight_init gets its weights drawn (a server, say); the loading thread's stay undrawn."""
    import threading

    inside, done = threading.Event(), threading.Event()
    other: list[torch.Tensor] = []

    def worker() -> None:
        inside.wait(timeout=30)
        other.append(nn.init.ones_(torch.zeros(4)))
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with skip_weight_init():
        mine = nn.init.ones_(torch.zeros(4))
        inside.set()
        assert done.wait(timeout=30)
    thread.join()
    assert torch.equal(mine, torch.zeros(4)) and torch.equal(other[0], torch.ones(4))
    assert torch.equal(nn.init.ones_(torch.zeros(2)), torch.ones(2))  # restored
