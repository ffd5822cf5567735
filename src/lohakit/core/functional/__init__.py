"""The LoHa math, in one place: pure functions on tensors, no module state.

One adapter on a layer with weight ``W`` of shape ``(out, in/groups, *k)``::

    ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b),     s = alpha / r

The factored identity used for the fast path::

    (A1 B1) ⊙ (A2 B2) = P Q,   P = A1 ⊙_row A2  (out × r1·r2),   Q = B1 ⊙_col B2  (r1·r2 × in)

so ``ΔW x = s · P (Q x)`` without ever forming the ``out × in`` matrix. Convolutions become a
chain of convolutions (Q as a k-sized kernel, then a 1x1 conv with P; Tucker: 1x1, core, 1x1).

One module per concern:

* :mod:`.geometry`: :class:`Geometry` (the base layer), :class:`HadaFactors`, factor shapes.
* :mod:`.delta`: ΔW and the Khatri-Rao products P, Q; the exact LoRA factors.
* :mod:`.conv`: convolutions as GEMM stages and the factored conv chain.
* :mod:`.autograd`: the custom autograd nodes of the factored and fused paths.
* :mod:`.cost`: the cost model that picks a path per call.
* :mod:`.dispatch`: :func:`loha_delta_forward`, the one entry point layers call.

Everything here is differentiable. Two custom autograd functions keep memory small:

* :class:`HadaWeight` / :class:`HadaWeightTucker` build ΔW saving only the factors.
* :class:`StageChain` runs the factored chain saving only its inputs (``x`` and the
  ``r1·r2``-channel intermediates), never the product of the chain with a full weight.

Factor tensors stay in their own dtype (float32 parameters); the chain runs in the input's
dtype: the small factors are cast, the activations never are.
"""

from .geometry import COMPUTE_PATHS, ComputePath, Geometry, HadaFactors, factor_shapes, _is_compiling  # noqa: F401  (Fn._is_compiling)
from .delta import (
    khatri_rao_rows,
    khatri_rao_cols,
    linear_qp,
    output_scale,
    lora_factors,
    frobenius_norm,
    HadaWeight,
    HadaWeightTucker,
    delta_weight,
)
from .conv import Stage, StageChain, apply_stages, factored_stages, apply_delta_weight
from .autograd import FactoredLinear, FactoredLinearFused, FactoredConvFused, MergedWeightFused, MergedWeightBuilt, merged_weight_forward
from .cost import (
    FACTORED_COST_BIAS,
    ELEMENTWISE_COST,
    DELTA_ELEMENTWISE_COST,
    prefer_factored,
    path_costs,
    choose_training_path,
    merged_weight_applicable,
    fused_conv_applicable,
    fused_conv_pays,
    fused_linear_applicable,
    positions,
    conv_output_positions,
)
from .dispatch import rank_dropout_mask, resolve_path, loha_delta_forward

__all__ = [
    "ComputePath",
    "Geometry",
    "HadaFactors",
    "factor_shapes",
    "khatri_rao_rows",
    "khatri_rao_cols",
    "linear_qp",
    "output_scale",
    "lora_factors",
    "frobenius_norm",
    "HadaWeight",
    "HadaWeightTucker",
    "delta_weight",
    "Stage",
    "StageChain",
    "apply_stages",
    "factored_stages",
    "apply_delta_weight",
    "FactoredLinear",
    "FactoredLinearFused",
    "FactoredConvFused",
    "MergedWeightFused",
    "merged_weight_forward",
    "MergedWeightBuilt",
    "COMPUTE_PATHS",
    "FACTORED_COST_BIAS",
    "ELEMENTWISE_COST",
    "DELTA_ELEMENTWISE_COST",
    "prefer_factored",
    "path_costs",
    "choose_training_path",
    "merged_weight_applicable",
    "fused_conv_applicable",
    "fused_conv_pays",
    "fused_linear_applicable",
    "positions",
    "conv_output_positions",
    "rank_dropout_mask",
    "resolve_path",
    "loha_delta_forward",
]
