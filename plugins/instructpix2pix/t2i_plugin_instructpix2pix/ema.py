"""The EMA weights of a CompVis/Lightning InstructPix2Pix checkpoint (timbrooks'
``instruct-pix2pix-00-22000.ckpt``), which the reference edits with (``generate.yaml`` load_ema).

Such a file holds the trained weights as ``model.diffusion_model.*`` and the EMA copy as
``model_ema.<name without dots>`` (LitEma's naming: ``model_ema.diffusion_modelinput_blocks00weight``;
diffusers' ``convert_ldm_unet_checkpoint(extract_ema=True)`` reads them the same way). The SD
plugin loads the former and keeps ``model_ema.*`` in the model's ``extras``; :func:`use_ema_weights`
swaps the EMA copy into the UNet.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from t2i_engine.errors import CheckpointError

__all__ = ["EMA_PREFIX", "UNET_PREFIX", "choose_weights", "has_ema", "swap_in_ema", "use_ema_weights"]

EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."


def has_ema(model: object) -> bool:
    """Whether ``model``'s checkpoint carried ``model_ema.*`` tensors."""
    return any(k.startswith(EMA_PREFIX) for k in getattr(model, "extras", {}))


def swap_in_ema(sd: Mapping[str, Tensor], *, source: str = "checkpoint") -> dict[str, Tensor]:
    """``sd`` with every ``model.diffusion_model.*`` tensor replaced by its EMA copy; a UNet key
    without one is a CheckpointError naming it (a partial EMA would be a silently mixed model)."""
    out = dict(sd)
    missing = []
    for key in sd:
        if key.startswith(UNET_PREFIX):
            flat = EMA_PREFIX + "".join(key.split(".")[1:])
            if flat in sd:
                out[key] = sd[flat]
            else:
                missing.append(key)
    if missing:
        raise CheckpointError(f"{source}: model_ema holds no copy of {missing[0]} (expected "
                              f"{EMA_PREFIX + ''.join(missing[0].split('.')[1:])}; {len(missing)} UNet keys lack one)")
    return out


def use_ema_weights(model: object) -> None:
    """Load the EMA copy in ``model``'s extras into its UNet (an SD plugin bundle), in place."""
    from t2i_plugin_sd.formats import join_single_file, split_single_file

    source = "checkpoint"
    full = join_single_file(model.weights())  # type: ignore[attr-defined]
    ema = split_single_file(swap_in_ema(full, source=source), source=source).unet
    model.denoiser.load_state_dict(ema, strict=True)  # type: ignore[attr-defined]


def choose_weights(model: object, *, ema: bool) -> None:
    """Settle which UNet weights ``model`` edits with when its checkpoint carried an EMA copy:
    the EMA ones (``ema=True``, the reference's) or the trained ones; either way the
    ``model_ema.*`` extras are dropped, so :func:`~t2i_plugin_instructpix2pix.edit.check_edit_model`
    accepts the model. No-op for a checkpoint without them."""
    if not has_ema(model):
        return
    if ema:
        use_ema_weights(model)
    model.extras = {k: v for k, v in model.extras.items() if not k.startswith(EMA_PREFIX)}  # type: ignore[attr-defined]
