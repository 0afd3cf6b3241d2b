"""Neural-network building blocks shared by the model plugins (UNet levels, attention, norms).

Every block calls the engine's compute ops through :mod:`t2i_engine.nn.ops`.
"""

from t2i_engine.nn.attention import (
    GEGLU,
    Attention,
    FeedForward,
    SpatialSelfAttention,
    SpatialTransformer,
    TransformerBlock,
)
from t2i_engine.nn.embeddings import TimestepEmbedding, timestep_embedding
from t2i_engine.nn.resblock import Downsample, GroupNorm, ResBlock, Upsample
from t2i_engine.nn.unet import UNet, UNetConfig

__all__ = [
    "GEGLU",
    "Attention",
    "Downsample",
    "FeedForward",
    "GroupNorm",
    "ResBlock",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "TimestepEmbedding",
    "TransformerBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
