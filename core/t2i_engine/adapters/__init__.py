"""Adapters (LoRA) for any model: layers, attachment by module name, file formats.

* :mod:`~t2i_engine.adapters.layers`: the LoRA layer and its scaling law.
* :mod:`~t2i_engine.adapters.attach`: targets by module name, attach/merge/unmerge, training.
* :mod:`~t2i_engine.adapters.keymaps`: the forward map a model plugin gives (our name -> spellings).
* :mod:`~t2i_engine.adapters.formats` and :mod:`~t2i_engine.adapters.load`: reading kohya,
  diffusers/PEFT, legacy diffusers and NeMo files; writing kohya and PEFT.
* :mod:`~t2i_engine.adapters.embeddings`: token embeddings (textual inversion, pivotal tuning),
  bundled in kohya files or on their own.
* :mod:`~t2i_engine.adapters.config`: the ``[[adapters]]`` job table and :func:`apply_adapters`.

See docs/lora.md.
"""

from t2i_engine.adapters.attach import Adapter, Target, attach, create_adapter, find_targets, match_targets, \
    trainable_parameters
from t2i_engine.adapters.embeddings import EmbeddingHost, TokenEmbeddings, save_textual_inversion
from t2i_engine.adapters.config import AdapterEntry, apply_adapters
from t2i_engine.adapters.formats import read_lora_file, save_kohya, save_peft
from t2i_engine.adapters.keymaps import KeyMap, TargetNames
from t2i_engine.adapters.layers import ConvShape, LoRA
from t2i_engine.adapters.load import LoadReport, load_lora

__all__ = ["Adapter", "AdapterEntry", "ConvShape", "EmbeddingHost", "TokenEmbeddings", "save_textual_inversion", "KeyMap", "LoRA", "LoadReport", "Target", "TargetNames",
           "apply_adapters", "attach", "create_adapter", "find_targets", "load_lora", "match_targets",
           "read_lora_file", "save_kohya", "save_peft", "trainable_parameters"]
