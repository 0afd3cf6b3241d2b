"""Attention op: reference (specification), Triton kernels, and the dispatcher."""

from t2i_engine.kernels.attention.dispatch import attention, triton_unsupported_reason
from t2i_engine.kernels.attention.reference import attention_reference

__all__ = ["attention", "attention_reference", "triton_unsupported_reason"]
