"""The ``[task] name = "dreambooth"`` table (docs/dreambooth.md lists every key with its source)."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs.validators import ge, gt, in_, le

from t2i_engine.config.fields import existing_path, option
from t2i_engine.data.common import TransformOptions

__all__ = ["DEFAULT_LORA_RANK", "DEFAULT_LORA_TARGETS", "DreamBoothConfig"]

DEFAULT_LORA_RANK = 4
"""diffusers ``train_dreambooth_lora.py --rank`` default."""

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The denoiser's attention projections: diffusers ``train_dreambooth_lora.py``'s UNet targets."""


def _nonempty(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, list) and not value:
        raise ValueError(f"{attribute.name}: give at least one entry or leave the key out")


@attrs.frozen(kw_only=True)
class DreamBoothConfig(TransformOptions):
    """Keys of ``[task]`` with ``name = "dreambooth"`` (besides ``resolution``, ``crop``, ``hflip`` and
    ``seed`` of the image transform, shared with the image datasets)."""

    # --- the subject -------------------------------------------------------------------------
    instance_data: str = existing_path(kind="dir", help="instance images: a plain folder (captions from .txt "
                                       "files beside the images) or kohya <repeats>_<name> subfolders")
    instance_prompt: str | None = option(default=None, help="caption of instance images without a caption file, "
                                         "with the rare identifier: \"a sks dog\"")
    # --- prior preservation ------------------------------------------------------------------
    prior_preservation: bool = option(default=True, help="train on class images too (the prior-preservation loss)")
    prior_loss_weight: float = option(default=1.0, validator=ge(0.0),
                                      help="weight of the class-image loss (diffusers, kohya: 1.0; NeMo: 0.5)")
    class_prompt: str | list[str] | None = option(default=None, validator=_nonempty, help="prompt(s) of the class "
                                                  "images the model samples (\"a dog\"); image i takes prompt i mod n")
    class_data: str | None = existing_path(default=None, kind="dir", help="your own class images (plain folder or "
                                           "kohya reg folder); the model samples only what they leave missing")
    num_class_images: int = option(default=100, validator=ge(1), help="class images wanted in all")
    class_images_dir: str = option(default="class_images", help="cache of sampled class images (relative: inside "
                                   "engine.output_dir); reused by every run with the same model and settings")
    sample_batch_size: int = option(default=4, validator=ge(1), help="class images per sampler run")
    # --- what trains ---------------------------------------------------------------------------
    method: Literal["lora", "full"] = option(default="lora", validator=in_(("lora", "full")),
                                             help="train a LoRA on the frozen model, or fine-tune its weights")
    train_text_encoder: bool = option(default=False, help="train the text encoder too (LoRA: adapters on it)")
    lora_rank: int | None = option(default=None, validator=attrs.validators.optional(ge(1)),
                                   help=f"LoRA rank (default {DEFAULT_LORA_RANK})")
    lora_alpha: float | None = option(default=None, validator=attrs.validators.optional(gt(0.0)),
                                      help="LoRA alpha: updates scale by alpha / rank (default: alpha = rank)")
    lora_targets: list[str] | None = option(default=None, validator=_nonempty, help="denoiser modules the LoRA "
                                            "adapts, by name relative to the denoiser (default: "
                                            + ", ".join(DEFAULT_LORA_TARGETS) + ")")
    lora_text_targets: list[str] | None = option(default=None, validator=_nonempty, help="text-encoder modules "
                                                 "(train_text_encoder; default: every one the model's LoRA key map "
                                                 "spells)")
    lora_dropout: float | None = option(default=None, validator=attrs.validators.optional([ge(0.0), le(1.0)]),
                                        help="dropout on the LoRA input (default 0)")
    token_embedding: str | None = option(default=None, help="pivotal tuning: train an input embedding for this "
                                         "word (the identifier, \"sks\") alongside the LoRA; written into the LoRA "
                                         "file (kohya bundle) and as a textual-inversion file")
    token_embedding_lr: float | None = option(default=None, validator=attrs.validators.optional(gt(0.0)),
                                              help="learning rate of token_embedding (default: train.lr); the "
                                              "LoRA keeps train.lr")
    # --- what is written -------------------------------------------------------------------------
    export_lora: str | None = option(default=None, help="LoRA file written after training (default "
                                     "lora.safetensors; relative: inside engine.output_dir)")
    lora_format: Literal["kohya", "peft"] | None = option(default=None, validator=attrs.validators.optional(
        in_(("kohya", "peft"))), help="kohya (default; with ss_* metadata) or peft (diffusers' layout)")
    lora_dtype: Literal["float32", "float16", "bfloat16"] | None = option(
        default=None, validator=attrs.validators.optional(in_(("float32", "float16", "bfloat16"))),
        help="dtype of the LoRA file (default float32)")
    export_embedding: str | None = option(default=None, help="textual-inversion file of token_embedding "
                                          "(diffusers' learned_embeds layout; default embedding.safetensors; "
                                          "relative: inside engine.output_dir)")
    export: str | None = option(default=None, help="full weights written after training (with method = lora: "
                                "the model with the LoRA merged in); relative: inside engine.output_dir")
    export_format: str | None = option(default=None, help="format of export (default: the model's own)")
