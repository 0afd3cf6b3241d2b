"""EMA weights of a timbrooks-style checkpoint: the trained UNet as ``model.diffusion_model.*`` and
another UNet as the flattened ``model_ema.*`` copy. diffusers' own reader
(``convert_ldm_unet_checkpoint(extract_ema=True)``) confirms the file's EMA naming; the engine then
edits with the EMA UNet by default, with the trained one on request, and refuses to guess."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.errors import CheckpointError
from t2i_plugin_instructpix2pix.edit import check_edit_model
from t2i_plugin_instructpix2pix.ema import choose_weights
from t2i_plugin_sd.formats import DiffusersFolder, SingleFile, read_state_dict
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:.*yaml cannot express")  # the tiny text tower's 4 heads


def _model(path):
    return build_model(SingleFile().load(str(path)) if path.is_file() else DiffusersFolder().load(str(path)),
                       PRESETS["sd-1"])


def _same(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_reads_the_files_ema_as_the_other_unet(ema_file):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path, _, other = ema_file
    unet = UNet2DConditionModel.from_pretrained(str(other / "unet"))
    theirs = convert_ldm_unet_checkpoint(read_state_dict(str(path)), dict(unet.config), extract_ema=True)
    ref = unet.state_dict()
    assert theirs.keys() == ref.keys() and all(torch.equal(theirs[k], ref[k]) for k in ref)


@pytest.mark.parametrize("ema", [True, False])
def test_choose_weights(ema_file, ema):
    path, trained, other = ema_file
    model = _model(path)
    with pytest.raises(ValueError, match="EMA weights"):
        check_edit_model(model)
    choose_weights(model, ema=ema)
    check_edit_model(model)
    assert _same(model.denoiser, _model(other if ema else trained).denoiser)
    assert not _same(model.denoiser, _model(trained if ema else other).denoiser)


def test_missing_ema_copy_named(ema_file):
    path, _, _ = ema_file
    model = _model(path)
    del model.extras["model_ema.diffusion_modelout2weight"]  # the last conv's EMA copy
    with pytest.raises(CheckpointError, match="no copy of model.diffusion_model.out.2.weight"):
        choose_weights(model, ema=True)
