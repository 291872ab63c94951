"""Triton kernels for the B-cos layers and the concept layer (README "Kernels").

* :mod:`kernels.bcos_postop` — Σx² map, fused B-cos post-op and its backward kernels;
* :mod:`kernels.bcos_conv` — fused B-cos convolution (implicit GEMM, norm and scale in the epilogue);
* :mod:`kernels.bcos_layer` — the B-cos layer on the kernels: autograd and per-shape path dispatch;
* :mod:`kernels.concept_encode`, :mod:`kernels.concept_decode` — the concept layer's kernels;
* :mod:`benchmarks.gpu_kernels` — correctness and speed on a GPU (``--smoke`` on the CPU interpreter).

Each kernel file holds its kernels, their launchers (which validate their inputs), the PyTorch
references and the ``torch.ops.fact.*`` operator registrations.

The layers of :mod:`fact_model` use them on CUDA according to ``FACT_KERNELS``
(:mod:`kernels._common`); everywhere else the PyTorch layers, which these kernels match, run.
Importing this package does not import Triton.
"""
