"""Triton kernels for the B-cos layers and the concept layer (CUDA only).

Not implemented yet (issue 5). Until then every device runs the PyTorch reference
layers of :mod:`fact_model.bcos` and :mod:`fact_model.concept_layer`, which these
kernels must match.
"""
