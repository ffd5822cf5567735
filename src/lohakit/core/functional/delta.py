"""ΔW and the Khatri-Rao products.

    ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b) = s · P Q,
    P = w1a ⊙_row w2a  (out × R),   Q = w1b ⊙_col w2b  (R × in),   R = r1·r2

:func:`delta_weight` materialises ΔW through lean autograd nodes that save only the factors
(:class:`HadaWeight`, :class:`HadaWeightTucker`); :func:`linear_qp` builds the P, Q pair the
factored paths use; :func:`lora_factors` gives the exact rank-R LoRA of a LoHa.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .geometry import Geometry, HadaFactors, _is_compiling


def khatri_rao_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: P[o, (i, j)] = a1[o, i] · a2[o, j].

    Args:
        a1: ``(out, r1)``.
        a2: ``(out, r2)``.

    Returns:
        ``(out, r1·r2)``.
    """
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)  # (out, r1*r2)


def khatri_rao_cols(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Column-wise Khatri-Rao product: Q[(i, j), c] = b1[i, c] · b2[j, c].

    Args:
        b1: ``(r1, n)``.
        b2: ``(r2, n)``.

    Returns:
        ``(r1·r2, n)``.
    """
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # (r1*r2, n)


def _as_rows(out_scale: torch.Tensor | float) -> torch.Tensor | float:
    """A per-row scale vector ``(out,)`` as a column ``(out, 1)``; scalars pass through."""
    return out_scale[:, None] if torch.is_tensor(out_scale) and out_scale.dim() == 1 else out_scale


def linear_qp(
    factors: HadaFactors, out_scale: torch.Tensor | float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q = w1b ⊙_col w2b ``(R, in)`` and Pᵀ = (S·w1a)ᵀ ⊙_col w2aᵀ ``(R, out)``, cast to ``dtype``.

    S is the output scale (s, or s · rank-dropout mask ``(out,)``), folded into the r-wide w1a
    (out·r multiplies instead of out·R). P is built transposed: the Khatri-Rao product then
    runs along the long ``out`` axis (about 1.5x faster on CPU than along r-wide rows), and
    ``(R, out)`` is the layout ``y += h Pᵀ`` reads directly. Only these small matrices are cast
    to the compute dtype, never the activations.
    """
    f = factors
    q = khatri_rao_cols(f.w1b, f.w2b).to(dtype)  # (R, in)
    p_t = khatri_rao_cols(*_a_transposed(f.w1a, f.w2a, out_scale)).to(dtype)  # (R, out)
    return q, p_t


def _a_transposed(
    w1a: torch.Tensor, w2a: torch.Tensor, out_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((S·w1a)ᵀ, w2aᵀ)``, ``(r1, out)`` and ``(r2, out)`` contiguous, factor dtype."""
    return _scale_rows(w1a, out_scale).T.contiguous(), w2a.T.contiguous()


def _scale_rows(w: torch.Tensor, out_scale: torch.Tensor | float) -> torch.Tensor:
    """``w`` ``(out, r)`` with row o multiplied by S[o] (S a scalar or an ``(out,)`` vector)."""
    return w * _as_rows(out_scale)


def output_scale(scale: float, row_mask: torch.Tensor | None, factors: HadaFactors) -> torch.Tensor | float:
    """s, or s · the rank-dropout mask as an ``(out,)`` vector in the factors' dtype and device."""
    if row_mask is None:
        return scale
    return row_mask.to(device=factors.w1a.device, dtype=factors.w1a.dtype) * scale


def lora_factors(factors: HadaFactors, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as an exact LoRA: ``ΔW (flattened to (out, in/g·prod(k))) = B @ A``, rank r1·r2.

    Flat: ``B = s·(w1a ⊙_row w2a)``, ``A = w1b ⊙_col w2b``. Tucker: each branch is
    ``W_i = wa_iᵀ @ Bt_i`` with ``Bt_i[p, (c, k)] = Σ_q t_i[p, q, k] · wb_i[q, c]``, so
    ``B = s·(w1aᵀ ⊙_row w2aᵀ)`` and ``A = Bt_1 ⊙_col Bt_2``. Never forms the out × in matrix.

    Args:
        factors: The adapter's factors (Tucker cores ``(r, r, *k)``, or PEFT's Conv1d ``(r, r, k, 1)``).
        scale: s, folded into B.

    Returns:
        ``B`` ``(out, r1·r2)`` and ``A`` ``(r1·r2, in/g·prod(k))`` in the factors' dtype.
    """
    f = factors
    if not f.tucker:
        return khatri_rao_rows(f.w1a, f.w2a) * scale, khatri_rao_cols(f.w1b, f.w2b)
    r1, r2 = f.t1.shape[0], f.t2.shape[0]
    bt1 = torch.einsum("pqk,qc->pck", f.t1.reshape(r1, f.t1.shape[1], -1), f.w1b).reshape(r1, -1)  # (r1, in·K)
    bt2 = torch.einsum("pqk,qc->pck", f.t2.reshape(r2, f.t2.shape[1], -1), f.w2b).reshape(r2, -1)  # (r2, in·K)
    return khatri_rao_rows(f.w1a.T, f.w2a.T) * scale, khatri_rao_cols(bt1, bt2)


def frobenius_norm(factors: HadaFactors, scale: float) -> torch.Tensor:
    """‖ΔW‖_F, by whichever form needs less memory.

    Factored: ‖B A‖_F² = trace((BᵀB)(AAᵀ)) with the exact LoRA (B ``(out, R)``, A ``(R, in·K)``,
    R = r1·r2) and two R×R Gram matrices, R·(R + out + in·K) values. Materialised: ΔW itself,
    out·in·K values. The factored form is taken only where it is no larger (up to a factor 4),
    so the memory is bounded by the factors' and ΔW's sizes, never by r⁴.
    """
    f = factors
    r1, r2 = f.ranks
    R = r1 * r2
    if f.tucker:
        out, cols = f.w1a.shape[1], f.w1b.shape[1] * math.prod(f.t1.shape[2:])
    else:
        out, cols = f.w1a.shape[0], f.w1b.shape[1]
    if R * (R + out + cols) <= 4 * out * cols:
        b, a = lora_factors(f, scale)
        sq = ((b.T @ b) * (a @ a.T)).sum()  # both Gram matrices are symmetric
        return sq.clamp_min(0).sqrt()
    if f.tucker:
        dw = _tucker_branch(f.t1, f.w1a, f.w1b) * _tucker_branch(f.t2, f.w2a, f.w2b)  # (out, in, *k)
    else:
        dw = (f.w1a @ f.w1b) * (f.w2a @ f.w2b)  # (out, in·K)
    return dw.norm() * abs(scale)


class HadaWeight(torch.autograd.Function):
    """ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b); saves the factors, rebuilds the products in backward."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):  # type: ignore[override]
        ctx.scale = scale
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b) * scale  # (out, n)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # dL/d(w1a@w1b), (out, n)
        g2 = grad * (w1a @ w1b)  # dL/d(w2a@w2b), (out, n)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def _tucker_branch(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[o, c, *k] = Σ_{p,q} t[p, q, *k] · wa[p, o] · wb[q, c]."""
    r1, r2 = t.shape[:2]
    k = t.shape[2:]
    tb = (wb.T @ t.transpose(0, 1).reshape(r2, -1)).reshape(-1, r1, *k)  # (c, p, *k)
    w = wa.T @ tb.transpose(0, 1).reshape(r1, -1)  # (o, c·K)
    return w.reshape(wa.shape[1], wb.shape[1], *k)  # (out, in, *k)


class HadaWeightTucker(torch.autograd.Function):
    """Tucker ΔW = s · W1 ⊙ W2 with W_i from :func:`_tucker_branch`; saves only the factors."""

    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scale: float):  # type: ignore[override]
        ctx.scale = scale
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        return _tucker_branch(t1, w1a, w1b) * _tucker_branch(t2, w2a, w2b) * scale

    @staticmethod
    @once_differentiable  # detaches the factors: differentiating this backward again raises
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        with torch.enable_grad():
            t1, w1a, w1b, t2, w2a, w2b = (t.detach().requires_grad_(n) for t, n in zip(saved, needs))
            grads = []
            for t, wa, wb, other in ((t1, w1a, w1b, (t2, w2a, w2b)), (t2, w2a, w2b, (t1, w1a, w1b))):
                if not any(x.requires_grad for x in (t, wa, wb)):
                    grads.append((None, None, None))
                    continue
                with torch.no_grad():
                    g = grad * _tucker_branch(*other) * ctx.scale  # dL/dW_i
                branch = _tucker_branch(t, wa, wb)
                inputs = [x for x in (t, wa, wb) if x.requires_grad]
                got = iter(torch.autograd.grad(branch, inputs, g))
                grads.append(tuple(next(got) if x.requires_grad else None for x in (t, wa, wb)))
        (g_t1, g_w1a, g_w1b), (g_t2, g_w2a, g_w2b) = grads
        return g_t1, g_w1a, g_w1b, g_t2, g_w2a, g_w2b, None


def delta_weight(factors: HadaFactors, geom: Geometry, scale: float) -> torch.Tensor:
    """The materialised ΔW in the base weight's orientation.

    Args:
        factors: The adapter's factors (any float dtype; the result has their dtype).
        geom: Geometry of the base layer.
        scale: s = alpha / r (times any multiplier).

    Returns:
        ``(out, in/g, *k)``, or ``(in, out)`` for a transposed (Conv1D) linear weight.
    """
    f = factors
    if f.tucker:
        k = geom.kernel_size
        t1 = f.t1.reshape(*f.t1.shape[:2], *k)  # drop PEFT's trailing 1 of Conv1d cores
        t2 = f.t2.reshape(*f.t2.shape[:2], *k)
        if _is_compiling():
            # HadaWeightTucker's backward calls torch.autograd.grad, which dynamo cannot trace;
            # under torch.compile build ΔW from plain ops (AOT autograd plans the saving itself).
            w = _tucker_branch(t1, f.w1a, f.w1b) * _tucker_branch(t2, f.w2a, f.w2b) * scale
        else:
            w = HadaWeightTucker.apply(t1, f.w1a, f.w1b, t2, f.w2a, f.w2b, scale)
    else:
        w = HadaWeight.apply(f.w1a, f.w1b, f.w2a, f.w2b, scale)
    w = w.reshape(geom.weight_shape)
    return w.T if geom.transposed else w
