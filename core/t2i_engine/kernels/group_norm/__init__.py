"""GroupNorm(+SiLU) op: reference (specification), Triton kernels, and the dispatcher."""

from t2i_engine.kernels.group_norm.dispatch import group_norm, triton_unsupported_reason
from t2i_engine.kernels.group_norm.reference import group_norm_reference

__all__ = ["group_norm", "group_norm_reference", "triton_unsupported_reason"]
