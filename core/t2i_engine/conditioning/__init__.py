"""Conditioning: the core mechanism that applies ``[[conditioners]]`` around the denoiser.

* :mod:`~t2i_engine.conditioning.config` - the core keys of every entry (scale, start/end,
  branch, inputs) and how the loader reads them;
* :mod:`~t2i_engine.conditioning.chain` - the chain of built conditioners and the composed
  network the core calls instead of the raw one;
* :mod:`~t2i_engine.conditioning.window` - the step window rule and the step clock;
* :mod:`~t2i_engine.conditioning.build` - building them once per run, refusing them where a task
  cannot apply them;
* :mod:`~t2i_engine.conditioning.inputs` - loading the images a job names;
* :mod:`~t2i_engine.conditioning.shapes` - the residual shapes of the core UNet.

The contract a conditioner fills in is :class:`t2i_engine.interfaces.Conditioner`.
"""

from t2i_engine.conditioning.build import build_conditioners, check_conditioner, refuse_conditioners
from t2i_engine.conditioning.chain import ConditionedNet, ConditionerChain, Entry
from t2i_engine.conditioning.config import CORE_KEYS, ConditionerConfig, ConditionerKeys
from t2i_engine.conditioning.inputs import load_image
from t2i_engine.conditioning.shapes import unet_residual_shapes
from t2i_engine.conditioning.window import StepClock, in_window

__all__ = [
    "CORE_KEYS", "ConditionedNet", "ConditionerChain", "ConditionerConfig", "ConditionerKeys", "Entry",
    "StepClock", "build_conditioners", "check_conditioner", "in_window", "load_image", "refuse_conditioners",
    "unet_residual_shapes",
]
