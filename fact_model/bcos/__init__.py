"""B-cos layers: the reference implementation of the alignment-weighted layers.

The Triton kernels in ``kernels/`` must match these modules; the maths lives in
:mod:`fact_model.bcos.functional`.
"""

from fact_model.bcos.conv import BcosConv2d, NormedConv2d
from fact_model.bcos.encoding import AddInverse, LogitLayer, default_logit_bias, encode_rgb
from fact_model.bcos.explanation_mode import Detachable, explanation_mode, in_explanation_mode
from fact_model.bcos.functional import bcos_combine, dynamic_scale, patch_norms, unit_norm_rows
from fact_model.bcos.linear import BcosLinear, NormedLinear
from fact_model.bcos.norms import BatchNormUncentered2d, PositionNormUncentered2d, make_norm_layer

__all__ = [
    "AddInverse",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosLinear",
    "Detachable",
    "LogitLayer",
    "NormedConv2d",
    "NormedLinear",
    "PositionNormUncentered2d",
    "bcos_combine",
    "default_logit_bias",
    "dynamic_scale",
    "encode_rgb",
    "explanation_mode",
    "in_explanation_mode",
    "make_norm_layer",
    "patch_norms",
    "unit_norm_rows",
]
