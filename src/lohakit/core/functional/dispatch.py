"""The one entry point layers call, :func:`loha_delta_forward`: rank dropout, the path chosen
per call, and the inference cache of Qᵀ/Pᵀ or ΔW for frozen factors.
"""

from __future__ import annotations

import torch

from .autograd import FactoredLinear, factored_linear_nograd
from .conv import (
    _chain_supported,
    _prepad,
    apply_delta_weight,
    apply_stages,
    factored_stages,
)
from .cost import positions, prefer_factored
from .delta import delta_weight, linear_qp, output_scale
from .geometry import ComputePath, Geometry, HadaFactors, _is_compiling


def rank_dropout_mask(
    n: int, p: float, rescale: bool, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bernoulli keep-mask over ΔW's output rows (float32, shape ``(n,)``).

    Rows are kept with probability 1 - p; with ``rescale`` the mask is divided by its mean
    (as PEFT does), except when every row dropped, where the all-zero mask is returned as is
    (PEFT would divide by zero there).
    """
    keep = (torch.rand(n, generator=generator) > p).to(torch.float32)
    if rescale:
        mean = keep.mean()
        if mean > 0:
            keep = keep / mean
    return keep.to(device) if device is not None else keep


def resolve_path(
    path: ComputePath, factors: HadaFactors, geom: Geometry, n_out: int, n_in: int, **cost: bool
) -> ComputePath:
    """``path`` itself, or for ``"auto"`` the cost model's choice (``cost``: prefer_factored's flags).

    This is the general (per-adapter, base output already computed) path, where the
    merged-weight node cannot run: ``"merged"`` resolves to ``"materialised"`` here.
    """
    if path == "merged":
        return "materialised"
    if path != "auto":
        return path
    return "factored" if prefer_factored(geom, factors.ranks, factors.tucker, n_out, n_in, **cost) else "materialised"


def _masked_delta(factors: HadaFactors, geom: Geometry, scale: float, row_mask: torch.Tensor | None) -> torch.Tensor:
    """ΔW (factor dtype, base orientation) with the rank-dropout mask applied to its output rows."""
    dw = delta_weight(factors, geom, scale)
    if row_mask is not None:
        shape = (1, -1) if geom.transposed else (-1, *[1] * (dw.dim() - 1))
        dw = dw * row_mask.to(dw.device).view(shape)
    return dw


def loha_delta_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    factors: HadaFactors,
    geom: Geometry,
    scale: float,
    row_mask: torch.Tensor | None = None,
    path: ComputePath = "auto",
    cache: dict | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``base_out + ΔW·x`` for one adapter, by the cheaper of the two paths.

    Args:
        x: Layer input: ``(..., in)`` for linear layers, ``(B, C, *spatial)`` or unbatched
            ``(C, *spatial)`` for convs.
        base_out: The base layer's output for ``x`` (same dtype as the result).
        factors: The adapter's factors.
        geom: Base layer geometry.
        scale: s = alpha / r.
        row_mask: Optional ``(out,)`` rank-dropout mask over output channels.
        path: ``"auto"`` (cost model), ``"factored"`` or ``"materialised"``.
        cache: Inference only. A dict owned by the caller in which the prepared, detached
            weights (P and Q, the conv chain's weights, or ΔW) are kept between calls; the
            caller must clear it whenever a factor, the scale or the dtype changes (the layer
            keys it on the factors' version counters). Ignored when a gradient is recorded
            for the factors or a ``row_mask`` is given, and while ``torch.compile`` traces.
        inplace: The caller owns ``base_out``: when no gradient is recorded, accumulate into
            it instead of allocating a second output tensor.

    Returns:
        Tensor shaped like ``base_out``.
    """
    dtype = base_out.dtype
    # No autograd graph is needed (inference, or frozen factors and inputs): skip the autograd
    # Function, optionally reuse the caller's cache and accumulate into base_out in place.
    if not _records_grad(x, base_out, factors):
        if cache is not None and (row_mask is not None or _is_compiling()):
            cache = None
        return _delta_forward_nograd(x, base_out, factors, geom, scale, row_mask, path, cache, inplace)
    path = resolve_path(path, factors, geom, *positions(x, base_out, geom), training=True)
    if x.dtype != dtype:
        x = x.to(dtype)
    if path == "materialised" or not _chain_supported(geom):
        dw = _masked_delta(factors, geom, scale, row_mask)  # float32, base orientation
        x, geom = _prepad(x, geom)
        return base_out + apply_delta_weight(x, dw.to(dtype), geom)
    out_scale = output_scale(scale, row_mask, factors)
    if geom.ndim == 0 and not factors.tucker:
        # Linear layers: the fused single-node autograd (see FactoredLinear).
        f = factors
        return FactoredLinear.apply(x, base_out, f.w1a, f.w1b, f.w2a, f.w2b, out_scale)
    x, geom = _prepad(x, geom)
    stages, weights = factored_stages(factors, geom, out_scale, dtype)
    unbatched = x.dim() == geom.ndim + 1
    if unbatched:
        x, base_out = x.unsqueeze(0), base_out.unsqueeze(0)
    y = apply_stages(x, stages, weights, base_out)
    return y.squeeze(0) if unbatched else y


#: Largest ΔW (elements) the inference cache keeps. A cached ΔW costs as much memory as the
#: base weight, so large layers whose cost model picks the materialised path (very high ranks)
#: rebuild ΔW per call instead of doubling the model's memory; their P, Q are still cached.
EVAL_CACHE_MAX_DELTA_NUMEL = 2**20


def _records_grad(x: torch.Tensor, base_out: torch.Tensor, factors: HadaFactors) -> bool:
    """Whether autograd would record this call (grad mode on and some input requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or base_out.requires_grad or any(t is not None and t.requires_grad for t in factors)


def _delta_forward_nograd(
    x: torch.Tensor,
    base_out: torch.Tensor,
    factors: HadaFactors,
    geom: Geometry,
    scale: float,
    row_mask: torch.Tensor | None,
    path: ComputePath,
    cache: dict | None,
    inplace: bool,
) -> torch.Tensor:
    """:func:`loha_delta_forward` when no gradient is recorded (see there for the arguments).

    The cache holds, per kind: ``"linear"`` (Q, P) cast to the compute dtype with the scale
    folded into P; ``"chain"`` (stages, weights) for convolutions; ``"delta"`` ΔW cast. With a
    cached ΔW the cost model drops the build term (it is paid once), see :func:`prefer_factored`.
    """
    dtype = base_out.dtype
    if path == "auto":
        n_out, n_in = positions(x, base_out, geom)
        decided = cache.get(("path", n_out, n_in)) if cache is not None else None  # per call shape
        if decided is None:
            decided = resolve_path(path, factors, geom, n_out, n_in, build_delta=not _keeps_delta(cache, geom))
            if cache is not None:
                cache[("path", n_out, n_in)] = decided
        path = decided
    if x.dtype != dtype:
        x = x.to(dtype)
    if path == "materialised" or not _chain_supported(geom):
        dw = cache.get("delta") if cache is not None else None
        if dw is None:
            dw = _masked_delta(factors, geom, scale, row_mask).to(dtype)  # base orientation
            if _keeps_delta(cache, geom):
                cache["delta"] = dw
        xp, g2 = _prepad(x, geom)
        y = apply_delta_weight(xp, dw, g2)
        return base_out.add_(y) if inplace else base_out + y
    if geom.ndim == 0 and not factors.tucker:
        qp = cache.get("linear") if cache is not None else None
        if qp is None:
            q, p_t = linear_qp(factors, output_scale(scale, row_mask, factors), dtype)  # (R, in), (R, out)
            qp = (q.T, p_t)  # the cache keeps Qᵀ as a contiguous copy
            if cache is not None:
                qp = (qp[0].contiguous(), p_t)
                cache["linear"] = qp
        return factored_linear_nograd(x, base_out, qp[0], qp[1], inplace)
    xp, g2 = _prepad(x, geom)
    chain = cache.get("chain") if cache is not None else None
    if chain is None:
        chain = factored_stages(factors, g2, output_scale(scale, row_mask, factors), dtype)
        if cache is not None:
            cache["chain"] = chain
    stages, weights = chain
    unbatched = xp.dim() == geom.ndim + 1
    h = xp.unsqueeze(0) if unbatched else xp
    for stage, w in zip(stages, weights):
        h = stage.forward(h, w)
    h = h.squeeze(0) if unbatched else h
    return base_out.add_(h) if inplace else base_out + h


def _keeps_delta(cache: dict | None, geom: Geometry) -> bool:
    """Whether the inference cache may keep this layer's ΔW (as large as the base weight)."""
    return cache is not None and geom.out_features * geom.flat_in <= EVAL_CACHE_MAX_DELTA_NUMEL
