"""The custom autograd nodes of the factored linear and fused paths.

Backward needs only x and h = x Qᵀ (N × R). With G = dL/dy:
    dP = s·Gᵀh,  dh = s·G P,  dQ = dhᵀx,  dx = dh Q
then the factor gradients by the product rule (:func:`_kr_factor_grads`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import kernels
from .conv import Stage
from .delta import _a_transposed, _scale_rows, _tucker_branch, khatri_rao_cols, linear_qp
from .geometry import HadaFactors, _is_compiling


class FactoredLinear(torch.autograd.Function):
    """Fused linear LoHa: ``y = base + (x Qᵀ) Pᵀ`` with P, Q built inside, one autograd node.

    ``Q = B1 ⊙_col B2`` ``(R, in)`` and ``P = S ⊙_rows (A1 ⊙_row A2)`` ``(out, R)``, R = r1·r2,
    S the per-row output scale (s, or s · rank-dropout mask). Compared with building P and Q
    out of autograd ops and running :class:`StageChain` (about ten graph nodes and five
    ``(out|in) × R`` temporaries per call), this records one node, builds P and Q once per call
    from the factors cast to the compute dtype (the ``N × in`` activations are never cast),
    saves only ``x`` and ``h = x Qᵀ`` (``N × R``) besides the factors, rebuilds P, Q in backward
    (``(in + out) · R`` multiplies, negligible) and adds into ``base`` with one ``addmm``.

    Backward, with G = dL/dy ``(N, out)``::

        dP = Gᵀ h,  dh = G P,  dQ = dhᵀ x,  dx = dh Q
        dA1[o,i] = S[o] Σ_j dP[o,(i,j)] A2[o,j]      dA2[o,j] = S[o] Σ_i dP[o,(i,j)] A1[o,i]
        dB1[i,c] = Σ_j dQ[(i,j),c] B2[j,c]           dB2[j,c] = Σ_i dQ[(i,j),c] B1[i,c]

    Factor gradients come back in the factors' dtype (float32 master weights).
    """

    @staticmethod
    def forward(ctx, x, base, w1a, w1b, w2a, w2b, out_scale):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.triton = kernels.triton_enabled(x)
        if ctx.triton:  # P and Q built tile by tile inside the GEMMs, never in memory
            h = kernels.kr_project(x2, w1b, w2b)  # (N, R)
            acc = None if base is None else base.reshape(-1, base.shape[-1]).clone()  # (N, out)
            out = kernels.kr_expand(h, w1a.T, w2a.T, scale=out_scale, out=acc)  # (N, out)
            out = out.reshape(*x.shape[:-1], out.shape[-1])  # (..., out)
        else:
            q, p_t = linear_qp(HadaFactors(w1a, w1b, w2a, w2b), out_scale, x.dtype)  # (R, in), (R, out)
            h = x2 @ q.T  # (N, R)
            if base is None:
                out = (h @ p_t).reshape(*x.shape[:-1], p_t.shape[1])  # (..., out)
            else:
                out = torch.addmm(base.reshape(-1, base.shape[-1]), h, p_t).reshape(base.shape)  # (..., out)
        ctx.has_base = base is not None
        ctx.scalar_scale = None if torch.is_tensor(out_scale) else out_scale
        scale_t = out_scale if torch.is_tensor(out_scale) else None
        ctx.save_for_backward(x, h, w1a, w1b, w2a, w2b, scale_t)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, h, w1a, w1b, w2a, w2b, scale_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        out_scale = ctx.scalar_scale if scale_t is None else scale_t
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        h, triton = _differentiable_h(x, h, w1b, w2b, ctx.triton)
        dx, g_w1a, g_w1b, g_w2a, g_w2b = _factored_linear_backward(
            g2, x, h, (w1a, w1b, w2a, w2b), out_scale, need[0], need[2:6], triton=triton
        )
        g_x = dx.reshape(x.shape) if dx is not None else None  # (..., in)
        g_base = g if ctx.has_base and need[1] else None
        return g_x, g_base, g_w1a, g_w1b, g_w2a, g_w2b, None


def _differentiable_h(
    x: torch.Tensor, h: torch.Tensor, w1b: torch.Tensor, w2b: torch.Tensor, triton: bool
) -> tuple[torch.Tensor, bool]:
    """The saved ``h = x Qᵀ``, or, when the backward itself is recorded (``create_graph=True``:
    gradient penalties, meta-learning), h rebuilt from x and the factors so that second-order
    terms see how it depends on them; the Triton kernels record no graph, so torch runs then."""
    if not torch.is_grad_enabled():
        return h, triton
    return x.reshape(-1, x.shape[-1]) @ khatri_rao_cols(w1b, w2b).to(x.dtype).T, False  # (N, R)


def _factored_linear_backward(
    g2: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rows: torch.Tensor | float,
    need_x: bool,
    need_factors: Sequence[bool],
    dx_into: torch.Tensor | None = None,
    triton: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """The backward shared by :class:`FactoredLinear` and :class:`FactoredLinearFused`.

    Args:
        g2: dL/dy flattened, ``(N, out)``.
        x: The saved input ``(..., in)``; h = x Qᵀ ``(N, R)``.
        factors: (w1a, w1b, w2a, w2b) in PEFT's flat layout.
        rows: The output scale S: s, or s · rank-dropout mask ``(out,)``.
        need_x: Whether to compute the adapter's share of dL/dx, ``dh Q``.
        need_factors: Which of (w1a, w1b, w2a, w2b) need a gradient.
        dx_into: When given, ``dh Q`` is accumulated into it in place (``(N, in)``).
        triton: Use the Khatri-Rao-fused kernels of :mod:`lohakit.core.kernels` (same quantities,
            P, Q and dQ never in memory).

    Returns:
        ``(dx, g_w1a, g_w1b, g_w2a, g_w2b)``; dx is ``(N, in)`` (``dx_into`` when given).
    """
    w1a, w1b, w2a, w2b = factors
    if triton:
        return _factored_linear_backward_kernels(g2, x, h, factors, rows, need_x, need_factors, dx_into)
    dtype = x.dtype
    dx = dh = None
    a_t = _a_transposed(w1a, w2a, rows)  # (r1, out), (r2, out): for Pᵀ and the A-gradients
    if need_x or need_factors[1] or need_factors[3]:
        p_t = khatri_rao_cols(*a_t).to(dtype)  # (R, out)
        dh = g2 @ p_t.T  # (N, R)
        if need_x:
            q = khatri_rao_cols(w1b, w2b).to(dtype)  # (R, in)
            dx = dx_into.addmm_(dh, q) if dx_into is not None else dh @ q  # (N, in)
    dpt = h.T @ g2 if need_factors[0] or need_factors[2] else None  # (R, out): dPᵀ before the scale
    dq = dh.T @ x.reshape(-1, x.shape[-1]) if need_factors[1] or need_factors[3] else None  # (R, in)
    return (dx, *_kr_factor_grads(dpt, dq, factors, rows, need_factors, a_t))


def _kr_factor_grads(
    dpt: torch.Tensor | None,
    dq: torch.Tensor | None,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rows: torch.Tensor | float,
    need_factors: Sequence[bool],
    a_t: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """Factor gradients from dL/dPᵀ and dL/dQ, by the product rule through the Khatri-Rao products.

    With P = S ⊙_rows (w1a ⊙_row w2a) and Q = w1b ⊙_col w2b::

        g_w1a[o,i] = S[o] Σ_j dPᵀ[(i,j),o] w2a[o,j]     g_w2a[o,j] = S[o] Σ_i dPᵀ[(i,j),o] w1a[o,i]
        g_w1b[i,c] = Σ_j dQ[(i,j),c] w2b[j,c]            g_w2b[j,c] = Σ_i dQ[(i,j),c] w1b[i,c]

    The sums run along the long axis (out or c) as mul + sum: about 2x faster on CPU than along
    r-wide rows or as ``out`` batched r×r matvecs.

    Args:
        dpt: dL/dPᵀ without the scale S, ``(R, out)`` (any dtype), or None when neither
            w1a nor w2a needs a gradient.
        dq: dL/dQ ``(R, in·K)`` (any dtype), or None when neither w1b nor w2b needs one.
        factors: (w1a, w1b, w2a, w2b) in PEFT's flat layout.
        rows: The output scale S: s, or s · rank-dropout mask ``(out,)``.
        need_factors: Which of (w1a, w1b, w2a, w2b) need a gradient.
        a_t: :func:`_a_transposed` of (w1a, w2a, rows), which the caller builds for Pᵀ anyway.

    Returns:
        ``(g_w1a, g_w1b, g_w2a, g_w2b)`` in the factors' dtype (None where not needed).
    """
    w1a, w1b, w2a, w2b = factors
    r1, r2 = w1b.shape[0], w2b.shape[0]
    g_w1a = g_w1b = g_w2a = g_w2b = None
    if dpt is not None:
        a1s_t, a2_t = a_t  # (r1, out), (r2, out)
        dpt3 = dpt.to(w1a.dtype).view(r1, r2, -1)  # (r1, r2, out)
        if need_factors[0]:
            g_w1a = _scale_rows((dpt3 * a2_t.unsqueeze(0)).sum(1).T, rows).contiguous()  # (out, r1)
        if need_factors[2]:
            g_w2a = (dpt3 * a1s_t.unsqueeze(1)).sum(0).T.contiguous()  # (out, r2)
    if dq is not None:
        dq3 = dq.to(w1b.dtype).view(r1, r2, -1)  # (r1, r2, in·K)
        if need_factors[1]:
            g_w1b = (dq3 * w2b.unsqueeze(0)).sum(1)  # (r1, in·K)
        if need_factors[3]:
            g_w2b = (dq3 * w1b.unsqueeze(1)).sum(0)  # (r2, in·K)
    return g_w1a, g_w1b, g_w2a, g_w2b


def _factored_linear_backward_kernels(
    g2: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rows: torch.Tensor | float,
    need_x: bool,
    need_factors: Sequence[bool],
    dx_into: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """:func:`_factored_linear_backward` through the Triton kernels (same arguments and results).

    With Pᵀ's Khatri-Rao structure over the output axis: ``dh = G P = kr_project(G, A1ᵀ, A2ᵀ, S)``
    and the A-gradients are the B-gradients of that projection with the roles of (G, h) swapped.
    """
    w1a, w1b, w2a, w2b = factors
    dx = g_w1a = g_w1b = g_w2a = g_w2b = None
    if need_factors[0] or need_factors[2]:
        g1t, g2t = kernels.kr_project_grad(h, g2, w1a.T, w2a.T, scale=rows)  # (r1, out), (r2, out)
        g_w1a, g_w2a = (g1t.T if need_factors[0] else None), (g2t.T if need_factors[2] else None)
    if need_x or need_factors[1] or need_factors[3]:
        dh = kernels.kr_project(g2, w1a.T, w2a.T, scale=rows)  # (N, R)
        if need_x:
            dx = kernels.kr_expand(dh, w1b, w2b, out=dx_into)  # (N, in)
        if need_factors[1] or need_factors[3]:
            gb1, gb2 = kernels.kr_project_grad(dh, x.reshape(-1, x.shape[-1]), w1b, w2b)  # (r1, in), (r2, in)
            g_w1b, g_w2b = (gb1 if need_factors[1] else None), (gb2 if need_factors[3] else None)
    return dx, g_w1a, g_w1b, g_w2a, g_w2b


class FactoredLinearFused(torch.autograd.Function):
    """A frozen ``nn.Linear`` and one LoHa adapter in one node: ``y = x Wᵀ + b + (x Qᵀ) Pᵀ``.

    Same math as :class:`FactoredLinear`, with the base layer folded in: the output is
    allocated once (the base GEMM writes it, the adapter accumulates with ``addmm_``, no copy
    of an ``N × out`` base output), and ``dL/dx = G W + dh Q`` is one GEMM plus one ``addmm_``
    instead of two ``N × in`` tensors summed by autograd. Saves ``x``, ``h``, W (a reference)
    and the factors. The base weight and bias must not require grad (the caller checks).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w1a, w1b, w2a, w2b, out_scale):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out = F.linear(x2, weight, bias)  # (N, out), freshly allocated
        ctx.triton = kernels.triton_enabled(x)
        if ctx.triton:
            h = kernels.kr_project(x2, w1b, w2b)  # (N, R)
            kernels.kr_expand(h, w1a.T, w2a.T, scale=out_scale, out=out)  # (N, out), in place
        else:
            q, p_t = linear_qp(HadaFactors(w1a, w1b, w2a, w2b), out_scale, x.dtype)  # (R, in), (R, out)
            h = x2 @ q.T  # (N, R)
            out.addmm_(h, p_t)  # (N, out), in place
        ctx.scalar_scale = None if torch.is_tensor(out_scale) else out_scale
        scale_t = out_scale if torch.is_tensor(out_scale) else None
        ctx.save_for_backward(x, h, weight, w1a, w1b, w2a, w2b, scale_t)
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, h, weight, w1a, w1b, w2a, w2b, scale_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        out_scale = ctx.scalar_scale if scale_t is None else scale_t
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        base_dx = g2 @ weight if need[0] else None  # (N, in): G W
        h, triton = _differentiable_h(x, h, w1b, w2b, ctx.triton)
        dx, g_w1a, g_w1b, g_w2a, g_w2b = _factored_linear_backward(
            g2, x, h, (w1a, w1b, w2a, w2b), out_scale, need[0], (need[3], need[4], need[5], need[6]),
            dx_into=base_dx, triton=triton,
        )
        g_x = dx.view(x.shape) if dx is not None else None  # (..., in): G W + dh Q
        return g_x, None, None, g_w1a, g_w1b, g_w2a, g_w2b, None


class FactoredConvFused(torch.autograd.Function):
    """A frozen ``nn.ConvNd`` (one group) and one flat LoHa adapter in one node.

    Forward as the factored chain: ``y = conv(x, W) + b + P·h`` with ``h = conv(x, Q_k)``
    (R channels, Q reshaped to the kernel) and P applied as a 1x1 conv by ``baddbmm`` into the
    base output. Saves x, h, W (a reference) and the factors.

    Backward: dL/dx is ONE transposed convolution with the merged weight ``W + ΔW``, where the
    chain needs the base's plus the adapter's own (``dh`` through ``Q_k``, N·R·in·K multiply-adds;
    a fifth of the base conv's at 320 channels and r = 8). ``W + ΔW = W + P Q`` is rebuilt as one
    GEMM from the P and Q the factor gradients need anyway: out·R·in·K multiply-adds,
    independent of N. Factor
    gradients: ``dPᵀ = Σ h Gᵀ``, ``dh = Pᵀ G``, ``dQ_k`` the weight gradient of ``h = conv(x, Q_k)``,
    then :func:`_kr_factor_grads`. Used where :func:`fused_conv_applicable` holds and the
    pixel count makes the saved convolution outweigh the rebuild (:func:`fused_conv_pays`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stage, w1a, w1b, w2a, w2b, out_scale):  # type: ignore[override]
        f = HadaFactors(w1a, w1b, w2a, w2b)
        q, p_t = linear_qp(f, out_scale, x.dtype)  # (R, in·K), (R, out)
        R, c_out = p_t.shape
        out = stage.forward(x, weight, bias)  # (B, out, *spatial), freshly allocated
        h = stage.forward(x, q.view(R, *weight.shape[1:]))  # (B, R, *spatial)
        b = out.shape[0]
        out.view(b, c_out, -1).baddbmm_(p_t.T.expand(b, -1, -1), h.view(b, R, -1))  # (B, out, S) += P h
        ctx.stage = stage
        ctx.scalar_scale = None if torch.is_tensor(out_scale) else out_scale
        ctx.save_for_backward(x, h, weight, w1a, w1b, w2a, w2b, out_scale if torch.is_tensor(out_scale) else None)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, h, weight, w1a, w1b, w2a, w2b, scale_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        rows = ctx.scalar_scale if scale_t is None else scale_t
        stage: Stage = ctx.stage
        dtype = x.dtype
        b, R, c_out = g.shape[0], h.shape[1], g.shape[1]
        g3 = g.reshape(b, c_out, -1)  # (B, out, S)
        need_f = need[4:8]
        need_q = need_f[1] or need_f[3]
        a_t = _a_transposed(w1a, w2a, rows)  # (r1, out), (r2, out): for Pᵀ and the A-gradients
        if need[0] or need_q or torch.is_grad_enabled():
            p_t = khatri_rao_cols(*a_t).to(dtype)  # (R, out)
            q = khatri_rao_cols(w1b, w2b).to(dtype)  # (R, in·K)
        if torch.is_grad_enabled():  # create_graph: h rebuilt from x and the factors (see _differentiable_h)
            h = stage.forward(x, q.view(R, *weight.shape[1:]))  # (B, R, *spatial)
        dx = dpt = dq = None
        if need[0]:
            # W + ΔW as one GEMM, ΔW = P Q (about 2.5x faster on CPU than (S·w1a@w1b) ⊙ (w2a@w2b) + W)
            w_eff = torch.addmm(weight.reshape(c_out, -1), p_t.T, q).view(weight.shape)  # (out, in, *k)
            dx = stage.backward(g, x, w_eff, need_input=True, need_weight=False)[0]  # (B, in, *spatial)
        if need_f[0] or need_f[2]:
            dpt = torch.bmm(h.view(b, R, -1), g3.transpose(1, 2)).sum(0)  # (R, out): Σ h Gᵀ
        if need_q:
            dh = torch.matmul(p_t, g3).view(h.shape)  # (B, R, *spatial): Pᵀ G
            dq = stage.backward(dh, x, q.view(R, *weight.shape[1:]), need_input=False, need_weight=True)[1]
            dq = dq.reshape(R, -1)  # (R, in·K)
        grads = _kr_factor_grads(dpt, dq, (w1a, w1b, w2a, w2b), rows, need_f, a_t)
        return (dx, None, None, None, *grads, None)


def factored_linear_nograd(
    x: torch.Tensor, base: torch.Tensor, q_t: torch.Tensor, p_t: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """``base + (x Qᵀ) Pᵀ`` with prepared ``Qᵀ`` ``(in, R)`` and ``Pᵀ`` ``(R, out)``, no autograd.

    The eval cache stores ``Qᵀ`` and ``Pᵀ`` contiguous: for one-token calls the two GEMVs then
    stream their operand row-major (about 2x faster on CPU than through transposed views),
    and 2-D inputs skip the reshape/view dispatches. With ``inplace`` (the caller owns
    ``base``) the product is accumulated into ``base`` by ``addmm_``, so no second ``N × out``
    tensor is allocated.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in)
    h = x2 @ q_t  # (N, R)
    if inplace and base.is_contiguous():
        (base if base.dim() == 2 else base.view(-1, base.shape[-1])).addmm_(h, p_t)  # (N, out), in place
        return base
    if base.dim() == 2:
        return torch.addmm(base, h, p_t)  # (N, out)
    return torch.addmm(base.reshape(-1, base.shape[-1]), h, p_t).reshape(base.shape)  # (..., out)


def _merged_weight(
    weight: torch.Tensor, adapters: Sequence[tuple[torch.Tensor, ...]], dtype: torch.dtype, keep_products: bool = True
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``W + Σ ΔW_a`` in ``dtype``, and each adapter's ``(M1·S, M2)`` (factor dtype, ``(out, in·K)``).

    ``ΔW_a = S_a ⊙_rows (A1 B1) ⊙ (A2 B2)``, S folded into the r-wide A1 (``M1·S = (S·A1) B1``),
    so ΔW is one ``addcmul`` pass per adapter into the flattened W: O(r·in·out) work, no
    ``N``-sized term. The sum runs in the wider of W's and the factors' dtypes (float32
    master factors on a 16-bit W: W is upcast once, as a merge does) and is cast once to the
    compute dtype. Without ``keep_products`` (nothing records a graph, the products are not
    returned) the first adapter's sum is built in place in its ``M2`` buffer: one ``out × in``
    allocation less.
    """
    out = weight.shape[0]
    acc = weight.reshape(out, -1)  # (out, in·K), a view
    products = []
    for k, (w1a, w1b, w2a, w2b, rows) in enumerate(adapters):
        m1s = _scale_rows(w1a, rows) @ w1b  # (out, in·K): S ⊙_rows A1 B1
        m2 = w2a @ w2b  # (out, in·K)
        if k == 0:  # the first adapter allocates the sum, in the wider of W's and the factors' dtypes
            wide = torch.promote_types(acc.dtype, m1s.dtype)
            if not keep_products and m2.dtype == wide:
                acc = m2.mul_(m1s).add_(acc)  # (out, in·K), in M2's buffer
            else:
                acc = torch.addcmul(acc.to(wide), m1s, m2)
        else:  # (adapters may keep their factors in different dtypes)
            acc.addcmul_(m1s.to(acc.dtype), m2.to(acc.dtype))
        if keep_products:
            products.append((m1s, m2))
    return acc.to(dtype).view(weight.shape), products


class MergedWeightFused(torch.autograd.Function):
    """A frozen ``nn.Linear`` / ``nn.ConvNd`` and its flat LoHa adapters as one node on ``W + ΣΔW``.

    The high-rank training path: where the factored chain's ``R = r1·r2``-wide GEMMs cost more
    than the layer's own (``r² ≳ in·out / (3·(in + out))``), the cheapest exact step runs the
    base layer once with the merged weight::

        forward   y  = layer(x, W + ΣΔW)                 one GEMM / conv (the base's own)
        backward  dx = layerᵀ(G, W + ΣΔW)                one GEMM / transposed conv (the base's own)
                  D  = ∂L/∂ΔW = Gᵀ x                      the one extra out×in GEMM (conv: weight grad)
                  dM1 = S·D ⊙ M2,  dM2 = S·D ⊙ M1          per adapter, M_i = A_i B_i (out × in·K)
                  dA1 = dM1 B1ᵀ, dB1 = A1ᵀ dM1, dA2 = dM2 B2ᵀ, dB2 = A2ᵀ dM2

    Every adapter of the layer shares the one D (their ΔW add). Memory across the step: only
    ``x`` (as a LoRA saves) and references to W and the factors; ``W + ΣΔW`` and the products
    ``M1``, ``M2`` are rebuilt in backward (O(r·in·out), a small fraction of the ``N``-sized
    GEMMs) rather than kept: kept, they would add a weight-sized tensor per adapted layer to
    the step's peak.

    Args (forward): ``x``; the frozen ``weight`` ``(out, in/g, *k)`` and ``bias``; ``stage``,
    the base layer's :class:`Stage` (``ndim == 0`` for linear); ``n`` adapters; then per
    adapter ``w1a, w1b, w2a, w2b, rows`` with ``rows`` the output scale S (s, or s · the
    rank-dropout mask ``(out,)``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stage, n, *flat):  # type: ignore[override]
        adapters = [flat[5 * i : 5 * i + 5] for i in range(n)]
        w_eff, _ = _merged_weight(weight, adapters, x.dtype, keep_products=False)  # (out, in/g, *k), x's dtype
        out = stage.forward(x, w_eff, bias)  # (..., out) or (B, out, *spatial)
        ctx.stage, ctx.n = stage, n
        ctx.scalars = [None if torch.is_tensor(a[4]) else a[4] for a in adapters]
        tensors = [t for a in adapters for t in (*a[:4], a[4] if torch.is_tensor(a[4]) else None)]
        ctx.save_for_backward(x, weight, *tensors)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad
        adapters = []
        for i in range(ctx.n):
            w1a, w1b, w2a, w2b, scale_t = tensors[5 * i : 5 * i + 5]
            adapters.append((w1a, w1b, w2a, w2b, ctx.scalars[i] if scale_t is None else scale_t))
        need_f = [need[5 + 5 * i : 9 + 5 * i] for i in range(ctx.n)]
        stage: Stage = ctx.stage
        # Rebuilt from the saved inputs with differentiable ops: under create_graph=True the
        # second-order terms see how everything here depends on x and the factors. Otherwise
        # the products' buffers are reused for their gradients (two out × in allocations less).
        recording = torch.is_grad_enabled()
        w_eff, products = _merged_weight(weight, adapters, x.dtype)
        dx, d = stage.backward(g, x, w_eff, need_input=need[0], need_weight=any(any(f) for f in need_f))
        del w_eff
        grads: list[torch.Tensor | None] = []
        if d is not None:
            d = d.reshape(weight.shape[0], -1)  # (out, in·K): ∂L/∂ΔW, x's dtype
        for (w1a, w1b, w2a, w2b, rows), (m1s, m2), nf in zip(adapters, products, need_f):
            g_w1a = g_w1b = g_w2a = g_w2b = None
            if d is not None and any(nf):
                d32 = d.to(m2.dtype)
                if nf[0] or nf[1]:
                    g1 = d32 * m2 if recording else m2.mul_(d32)  # (out, in·K): ∂L/∂(A1 B1) before S
                    g_w1a = _scale_rows(g1 @ w1b.T, rows) if nf[0] else None  # (out, r1)
                    g_w1b = _scale_rows(w1a, rows).T @ g1 if nf[1] else None  # (r1, in·K)
                if nf[2] or nf[3]:
                    g2 = d32 * m1s if recording else m1s.mul_(d32)  # (out, in·K): ∂L/∂(A2 B2)
                    g_w2a = g2 @ w2b.T if nf[2] else None  # (out, r2)
                    g_w2b = w2a.T @ g2 if nf[3] else None  # (r2, in·K)
            grads += [g_w1a, g_w1b, g_w2a, g_w2b, None]
        return (dx, None, None, None, None, *grads)


def _summed_delta(
    flat: Sequence[torch.Tensor | None], kinds: Sequence[tuple[bool, torch.Tensor | float]], kernel: tuple[int, ...]
) -> torch.Tensor:
    """``Σ ΔW_a`` ``(out, in/g, *k)`` in the factors' dtype, from plain differentiable ops.

    ``flat`` holds six tensors per adapter (w1a, w1b, w2a, w2b, t1, t2; the cores None when
    flat), ``kinds`` per adapter (tucker, S). Tucker: ``ΔW = S · W1 ⊙ W2`` with
    ``W_i[o, c, *k] = Σ t_i[p, q, *k] wa_i[p, o] wb_i[q, c]``; flat: ``S ⊙_rows (A1 B1) ⊙ (A2 B2)``.
    """
    total = None
    for i, (tucker, rows) in enumerate(kinds):
        w1a, w1b, w2a, w2b, t1, t2 = flat[6 * i : 6 * i + 6]
        if tucker:
            t1 = t1.reshape(*t1.shape[:2], *kernel)  # drop PEFT's trailing 1 of Conv1d cores
            t2 = t2.reshape(*t2.shape[:2], *kernel)
            dw = _tucker_branch(t1, w1a, w1b) * _tucker_branch(t2, w2a, w2b)  # (out, in/g, *k)
            dw = dw * (rows.view(-1, *[1] * (dw.dim() - 1)) if torch.is_tensor(rows) else rows)
        else:
            dw = ((_scale_rows(w1a, rows) @ w1b) * (w2a @ w2b)).view(w1a.shape[0], -1, *kernel)  # (out, in/g, *k)
        total = dw if total is None else total + dw.to(total.dtype)
    return total


class MergedWeightBuilt(torch.autograd.Function):
    """:class:`MergedWeightFused` for any mix of flat and Tucker adapters on a frozen ConvNd
    (reached through :func:`merged_weight_forward`).

    Same step (forward and dL/dx on ``W + ΣΔW``, ∂L/∂ΔW = Gᵀx the one extra GEMM), with ΔW built
    by :func:`_summed_delta` and its factor gradients taken by autograd through that build,
    rebuilt in backward from the saved factors (nothing weight-sized is kept across the step).
    Its backward is not itself differentiable (``once_differentiable``, as
    :class:`HadaWeightTucker`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stage, kinds, kernel, *flat):  # type: ignore[override]
        dw = _summed_delta(flat, kinds, kernel)  # (out, in/g, *k)
        w_eff = _plus_delta(weight, dw, x.dtype)
        ctx.stage, ctx.kinds, ctx.kernel = stage, kinds, kernel
        ctx.present = [t is not None for t in flat]
        ctx.save_for_backward(x, weight, *(t for t in flat if t is not None))
        return stage.forward(x, w_eff, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x, weight, *saved = ctx.saved_tensors
        need_f = ctx.needs_input_grad[6:]
        it = iter(saved)
        flat = [next(it) if p else None for p in ctx.present]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(flat, need_f)]
            dw = _summed_delta(leaves, ctx.kinds, ctx.kernel)  # (out, in/g, *k)
        w_eff = _plus_delta(weight, dw.detach(), x.dtype)
        dx, d = ctx.stage.backward(g, x, w_eff, need_input=ctx.needs_input_grad[0], need_weight=any(need_f))
        grads: list[torch.Tensor | None] = [None] * len(flat)
        inputs = [t for t in leaves if t is not None and t.requires_grad]
        if d is not None and inputs:
            got = iter(torch.autograd.grad(dw, inputs, d.to(dw.dtype).view(dw.shape)))
            grads = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        return (dx, None, None, None, None, None, *grads)


def merged_weight_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stage: Stage,
    adapters: Sequence[tuple[HadaFactors, torch.Tensor | float]],
    kernel: tuple[int, ...],
) -> torch.Tensor:
    """The base layer on ``W + ΣΔW`` for adapters ``(factors, S)``, differentiable; saves ``x`` only.

    Flat adapters go through :class:`MergedWeightFused` (explicit product-rule backward, buffers
    reused); any Tucker adapter through :class:`MergedWeightBuilt`. While ``torch.compile``
    traces, the same formula from plain ops (AOT autograd plans what to save and recompute).
    """
    flat = [t for f, _ in adapters for t in (f.w1a, f.w1b, f.w2a, f.w2b, f.t1, f.t2)]
    kinds = tuple((f.tucker, s) for f, s in adapters)
    if _is_compiling():
        return stage.forward(x, _plus_delta(weight, _summed_delta(flat, kinds, kernel), x.dtype), bias)
    if any(tucker for tucker, _ in kinds):
        return MergedWeightBuilt.apply(x, weight, bias, stage, kinds, kernel, *flat)
    return MergedWeightFused.apply(x, weight, bias, stage, len(adapters), *(t for f, sc in adapters for t in (*f[:4], sc)))


def _plus_delta(weight: torch.Tensor, dw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W + ΔW`` summed in the wider of the two dtypes, cast once to ``dtype``."""
    return (weight.to(torch.promote_types(weight.dtype, dw.dtype)) + dw).to(dtype)
