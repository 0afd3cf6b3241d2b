"""Dense layers (linear, 1x1 convolution) on the CPU through oneDNN.

PyTorch runs a float32 ``F.linear`` on the CPU through the BLAS it was built with (MKL in the
official wheels), and a 1x1 float32 ``F.conv2d`` through its own unfold-and-GEMM path. On the
AMD EPYC of docs/benchmarks.md oneDNN, which PyTorch already ships for its convolutions and its
bf16 matmuls, is about twice as fast for both (250 against 110 GFLOPS for the linear), with the
same float32 arithmetic; on other CPUs the gap may be smaller (not measured). :mod:`.dispatch` picks oneDNN where it applies (see there); ``reference.py``
is the specification.
"""

from t2i_engine.kernels.dense.dispatch import conv2d, linear, onednn_unsupported_reason

__all__ = ["conv2d", "linear", "onednn_unsupported_reason"]
