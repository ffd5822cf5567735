"""The cost model: which path a call takes, from its shape.

Factored when 2·R·(in+out)·N (skinny GEMMs, weighted by :data:`FACTORED_COST_BIAS`) plus the
Khatri-Rao passes costs less than building ΔW and applying it; the fused nodes when their
preconditions hold and they pay. Constants calibrated with ``python -m bench calibrate``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .geometry import Geometry, HadaFactors, _autocast_on

#: Multiplier on the factored path's matmul FLOPs (>1 favours materialising): its matmuls are
#: skinny (one side R = r1·r2 wide) and run below peak. Calibrated on CPU (``python -m bench
#: calibrate``, see bench/RESULTS.md); the seed prototype's 1.5 over-penalised mid-size convs.
FACTORED_COST_BIAS = 1.25


#: Cost of one elementwise pass over one element, in matmul-FLOP units. The Khatri-Rao builds of
#: P and Q and their product-rule gradients, and the Hadamard product of the materialised path,
#: are memory-bound passes; on CPU one element costs about as much as 40 matmul FLOPs. Without
#: this term the model chose the factored path for R = r1·r2 ≳ 1000 on small layers, where
#: building P, Q (R·(in+out) elements, several times per step) dominates.
ELEMENTWISE_COST = 40

#: The same for a pass over an ``out × in`` ΔW-sized tensor (building ΔW, W + ΔW, and the
#: merged-weight node's products and their gradients): those arrays outgrow the caches the
#: r-wide Khatri-Rao products fit in, so a pass costs more. Fitted on CPU with ``python -m
#: bench calibrate`` (the ΔW build at 1024² and 320-channel 3x3 convs, N = 16 and 512).
DELTA_ELEMENTWISE_COST = 110

#: Fixed cost of the factored path's extra operator calls on a training step (the Khatri-Rao
#: builds and product-rule gradients are about ten more small kernels than the merged-weight
#: node runs), in matmul-FLOP units: about 0.1 ms on CPU, which decides only tiny layers
#: (64² at 16 tokens), where it is the whole difference.
FACTORED_CALL_OVERHEAD = 8e6


def path_costs(
    geom: Geometry,
    ranks: tuple[int, int],
    tucker: bool,
    n_out: int,
    n_in: int,
    build_delta: bool = True,
    training: bool = False,
) -> dict[str, float]:
    """The predicted cost of each path for one adapter on one call, beyond the base layer's own.

    Costs in matmul FLOPs (R = r1·r2, K = prod(kernel), g = groups, dense = out·in/g·K,
    E = :data:`ELEMENTWISE_COST`, E_Δ = :data:`DELTA_ELEMENTWISE_COST`, B = :data:`FACTORED_COST_BIAS`);
    the matmul passes are m = 2 for a forward call and m = 6 for a training step (forward,
    dL/dx, dL/dweights)::

        build        = [4·max(r)·dense + 2·E_Δ·dense]·(4 if training else 1)
        materialised = m·N·dense + build
        merged       = 2·N·dense + build                                    (training only)
        factored     = B·m·(N·R·in·K·g + N·out·R) + E·e·R·(in·K + out) [+ C]       (flat)
        factored     = B·m·(N_in·R·in·g + N·R²·K·g + N·out·R) + E·e·(R·(in + out) + R²·K) [+ C]   (Tucker)

    with e = 2 elementwise passes over the Khatri-Rao products for a forward call and 8 for
    a training step (build, rebuild in backward, product-rule gradients), and C =
    :data:`FACTORED_CALL_OVERHEAD` on training calls. ``build`` and the
    factored Khatri-Rao term vanish when ``build_delta`` is False (both cached at inference).
    The merged-weight node (:class:`MergedWeightFused`) runs the base layer on ``W + ΔW``, so
    of the materialised path's three ``N``-sized GEMMs only ∂L/∂ΔW = Gᵀx remains; it builds
    ΔW as often as the materialised path does (forward, rebuilt in backward, four gradient
    GEMMs). Its key is present for training calls only; whether it applies to a layer is
    :func:`merged_weight_applicable`'s question.

    Args:
        geom: Base layer geometry.
        ranks: (r1, r2).
        tucker: Whether the adapter is in Tucker form.
        n_out: Output positions (tokens, or batch·output pixels).
        n_in: Input positions (for the Tucker 1x1 stage at input resolution).
        build_delta: Count the cost of building ΔW / P and Q (False when cached).
        training: The call will be differentiated (a backward pass follows).

    Returns:
        ``{"factored": ..., "materialised": ...}``, plus ``"merged"`` for training calls.
    """
    r1, r2 = ranks
    R = r1 * r2
    K = geom.kernel_numel
    g = geom.groups
    E, E_delta = ELEMENTWISE_COST, DELTA_ELEMENTWISE_COST
    m = 6 if training else 2
    dense = geom.out_features * geom.flat_in
    build = (4 * max(r1, r2) * dense + 2 * E_delta * dense) * (4 if training else 1) if build_delta else 0
    if tucker:
        gemm = n_in * R * geom.in_features * g + n_out * R * R * K * g + n_out * geom.out_features * R
        kr = R * (geom.in_features + geom.out_features) + R * R * K
    else:
        gemm = n_out * R * geom.flat_in * g + n_out * geom.out_features * R
        kr = R * (geom.flat_in + geom.out_features)
    costs = {
        "factored": FACTORED_COST_BIAS * m * gemm + (E * (8 if training else 2) * kr if build_delta else 0)
        + (FACTORED_CALL_OVERHEAD if training else 0),
        "materialised": m * n_out * dense + build,
    }
    if training:
        costs["merged"] = 2 * n_out * dense + build
    return costs


def prefer_factored(
    geom: Geometry,
    ranks: tuple[int, int],
    tucker: bool,
    n_out: int,
    n_in: int,
    build_delta: bool = True,
    training: bool = False,
) -> bool:
    """Whether the factored chain is cheaper than materialising ΔW for this call (:func:`path_costs`).

    Crossovers measured on CPU (fp32 training step, factored / materialised time; see
    bench/RESULTS.md): Linear 1024² at r = 8: 0.2–0.45 from 1 to 512 tokens (factored always);
    at r = 32 (R = 1024) factored loses from ~16 tokens up (1.3–1.5). Linear 256² flips
    between r = 8 (0.4) and r = 16 (1.5) at 512 tokens; Linear 64² is materialised at any r.
    3x3 conv 320 ch: factored up to r = 16 at 8² (0.65), tie at r = 16 at 32² (1.0),
    materialised at r = 32; 32-channel convs are materialised from r = 8.
    """
    costs = path_costs(geom, ranks, tucker, n_out, n_in, build_delta=build_delta, training=training)
    return costs["factored"] < costs["materialised"]


def choose_training_path(
    geom: Geometry, adapters: Sequence[HadaFactors], n_out: int, n_in: int, merged_ok: bool
) -> str:
    """``"factored"``, ``"merged"`` or ``"materialised"`` for a training call of these adapters.

    The sum of the adapters' :func:`path_costs` per path; ``"merged"`` only where
    ``merged_ok`` (the merged-weight node applies to the layer: :func:`merged_weight_applicable`),
    and then its shared ∂L/∂ΔW GEMM is counted once.
    """
    totals: dict[str, float] = {}
    for f in adapters:
        for path, cost in path_costs(geom, f.ranks, f.tucker, n_out, n_in, training=True).items():
            totals[path] = totals.get(path, 0.0) + cost
    if merged_ok:
        totals["merged"] -= 2 * n_out * geom.out_features * geom.flat_in * (len(adapters) - 1)
    else:
        totals.pop("merged", None)
    return min(totals, key=totals.__getitem__)


def merged_weight_applicable(base: torch.nn.Module, x: torch.Tensor, adapters: Sequence[HadaFactors]) -> bool:
    """Whether :class:`MergedWeightFused` can replace ``base(x)`` plus these adapters exactly.

    Needs a plain ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (exact type, no hooks, forward not
    patched), zero padding given as numbers, for a conv a batched input, frozen weight and
    bias in x's dtype, no autocast, and a recorded gradient. Grouped convolutions and Tucker
    factors on convs qualify (ΔW has the grouped weight's shape; Tucker adapters go through
    :class:`MergedWeightBuilt`).
    """
    if type(base) not in _MERGEABLE or not adapters:
        return False
    if type(base) is torch.nn.Linear and any(f.tucker for f in adapters):
        return False
    if not torch.is_grad_enabled() or _autocast_on(x.device.type):
        return False
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return False
    if type(base) is not torch.nn.Linear:
        if base.padding_mode != "zeros" or isinstance(base.padding, str) or x.dim() != base.weight.dim():
            return False
    w, b = base.weight, base.bias
    if w.requires_grad or (b is not None and b.requires_grad) or w.dtype != x.dtype or w.device != x.device:
        return False
    return x.requires_grad or any(t.requires_grad for f in adapters for t in f if t is not None)


_MERGEABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def fused_conv_applicable(base: torch.nn.Module, x: torch.Tensor, factors: HadaFactors) -> bool:
    """Whether :class:`FactoredConvFused` can replace ``base(x)`` plus the adapter exactly.

    Needs a plain ``nn.Conv1d/2d/3d`` (exact type, no hooks, forward not patched) with one
    group, zero padding given as numbers, a batched input, frozen weight and bias in x's dtype,
    flat (non-Tucker) factors, and a recorded gradient.
    """
    if type(base) not in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) or factors.tucker:
        return False
    if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
        return False
    if x.dim() != base.weight.dim() or not torch.is_grad_enabled() or _autocast_on(x.device.type):
        return False
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return False
    w, b = base.weight, base.bias
    if w.requires_grad or (b is not None and b.requires_grad) or w.dtype != x.dtype or w.device != x.device:
        return False
    return x.requires_grad or any(t.requires_grad for t in factors if t is not None)


def fused_conv_pays(geom: Geometry, n_out: int, needs_dx: bool) -> bool:
    """Whether folding the adapter's dL/dx into the base's (:class:`FactoredConvFused`) is cheaper.

    It saves the adapter's own transposed convolution, ``N·R·in·K`` multiply-adds for N output
    positions, and costs the rebuild of ``W + P Q``, ``out·R·in·K``: it pays from N = out. Taken
    from N > 2·out (measured on CPU, 3x3 conv at 320 channels, r = 8: break-even near 460
    positions, 1.5·out). Without dL/dx (a frozen input) both paths do the same work and the
    chain is kept.
    """
    return needs_dx and n_out > 2 * geom.out_features


def fused_linear_applicable(base: torch.nn.Module, x: torch.Tensor, factors: HadaFactors) -> bool:
    """Whether :class:`FactoredLinearFused` can replace ``base(x)`` plus the adapter exactly.

    Needs a plain ``nn.Linear`` (exact type, no hooks, forward not patched by e.g. accelerate),
    frozen base weight and bias in x's dtype, flat factors, and a recorded gradient.
    """
    if type(base) is not torch.nn.Linear or factors.tucker or not torch.is_grad_enabled():
        return False
    if _autocast_on(x.device.type):  # autocast re-types the GEMMs; the general path handles it
        return False
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return False
    w, b = base.weight, base.bias
    if w.requires_grad or (b is not None and b.requires_grad) or w.dtype != x.dtype or w.device != x.device:
        return False
    return x.requires_grad or any(t.requires_grad for t in factors if t is not None)


def positions(x: torch.Tensor, base_out: torch.Tensor | None, geom: Geometry) -> tuple[int, int]:
    """(output positions, input positions) of a call: tokens, or batch · pixels. For convolutions
    the output count is read off ``base_out``, or, before the base has run (``None``), worked
    out from the convolution's arithmetic (:func:`conv_output_positions`)."""
    if geom.ndim == 0:
        n = x.numel() // max(geom.in_features, 1)
        return n, n
    n_in = x.numel() // max(geom.in_features * geom.groups, 1)
    if base_out is None:
        return conv_output_positions(x, geom), n_in
    return base_out.numel() // max(geom.out_features, 1), n_in


def conv_output_positions(x: torch.Tensor, geom: Geometry) -> int:
    """Batch · output pixels of a convolution, from its input alone."""
    spatial = x.shape[-geom.ndim:]
    n = x.numel() // max(math.prod(spatial) * geom.in_features * geom.groups, 1)  # batch
    if geom.padding == "same":
        return n * math.prod(spatial)
    padding = (0,) * geom.ndim if geom.padding == "valid" else geom.padding
    for size, k, s, p, d in zip(spatial, geom.kernel_size, geom.stride, padding, geom.dilation):
        n *= max((size + 2 * p - d * (k - 1) - 1) // s + 1, 0)
    return n
