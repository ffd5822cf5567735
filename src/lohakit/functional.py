"""The LoHa math, in one place: pure functions on tensors, no module state.

One adapter on a layer with weight ``W`` of shape ``(out, in/groups, *k)``::

    ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b),     s = alpha / r

The factored identity used for the fast path::

    (A1 B1) ⊙ (A2 B2) = P Q,   P = A1 ⊙_row A2  (out × r1·r2),   Q = B1 ⊙_col B2  (r1·r2 × in)

so ``ΔW x = s · P (Q x)`` without ever forming the ``out × in`` matrix. Convolutions become a
chain of convolutions (Q as a k-sized kernel, then a 1x1 conv with P; Tucker: 1x1, core, 1x1).

Everything here is differentiable. Two custom autograd functions keep memory small:

* :class:`HadaWeight` / :class:`HadaWeightTucker` build ΔW saving only the factors.
* :class:`StageChain` runs the factored chain saving only its inputs (``x`` and the
  ``r1·r2``-channel intermediates), never the product of the chain with a full weight.

Factor tensors stay in their own dtype (float32 parameters); the chain runs in the input's
dtype: the small factors are cast, the activations never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kernels

__all__ = [
    "Geometry",
    "HadaFactors",
    "Stage",
    "HadaWeight",
    "HadaWeightTucker",
    "StageChain",
    "FactoredLinear",
    "FactoredLinearFused",
    "FactoredConvFused",
    "khatri_rao_rows",
    "khatri_rao_cols",
    "lora_factors",
    "frobenius_norm",
    "factor_shapes",
    "delta_weight",
    "factored_stages",
    "apply_stages",
    "apply_delta_weight",
    "prefer_factored",
    "rank_dropout_mask",
    "loha_delta_forward",
    "ComputePath",
]

ComputePath = Literal["auto", "factored", "materialised"]


@dataclass(frozen=True)
class Geometry:
    """What the math needs to know about a base layer.

    Attributes:
        out_features: Output features / channels.
        in_features: Input features; for convolutions the input channels *per group*.
        kernel_size: ``()`` for linear layers, ``(k,)``/``(kh, kw)``/``(kd, kh, kw)`` for convs.
        stride, padding, dilation: Convolution parameters (empty for linear layers).
        groups: Convolution groups.
        transposed: True when the base weight is stored ``(in, out)`` (transformers' Conv1D).
        padding_mode: nn.ConvNd's padding mode ('zeros', 'reflect', 'replicate', 'circular').
        explicit_pad: For non-zero padding modes, the F.pad amounts (last dim first) that
            nn.ConvNd applies before a convolution with no padding.
    """

    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False
    padding_mode: str = "zeros"
    explicit_pad: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """0 for linear layers, else the number of spatial dimensions."""
        return len(self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """ΔW shape in the (out, in, *k) orientation (before any Conv1D transpose)."""
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def flat_in(self) -> int:
        """Columns of the flattened weight: in/groups · prod(k)."""
        return self.in_features * self.kernel_numel


class HadaFactors(NamedTuple):
    """The factors of one LoHa adapter (PEFT's layout).

    Flat (linear, or conv flattened): w1a/w2a ``(out, r)``, w1b/w2b ``(r, in/g·prod(k))``.
    Tucker (``use_effective_conv2d``): w1a/w2a ``(r, out)``, w1b/w2b ``(r, in/g)``,
    t1/t2 ``(r, r, *k)`` (PEFT stores Conv1d cores as ``(r, r, k, 1)``; accepted).
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def ranks(self) -> tuple[int, int]:
        return self.w1b.shape[0], self.w2b.shape[0]


def factor_shapes(geom: Geometry, r: int, tucker: bool, conv1d_core_4d: bool = True) -> dict[str, tuple[int, ...]]:
    """Shapes of the factor parameters for a layer, in PEFT's layout.

    Args:
        geom: The base layer's geometry.
        r: Rank of both Hadamard branches.
        tucker: Whether to use the Tucker (effective conv) form.
        conv1d_core_4d: Store Conv1d Tucker cores as ``(r, r, k, 1)`` like PEFT does.
    """
    if not tucker:
        return {
            "hada_w1_a": (geom.out_features, r),
            "hada_w1_b": (r, geom.flat_in),
            "hada_w2_a": (geom.out_features, r),
            "hada_w2_b": (r, geom.flat_in),
        }
    core = (r, r, *geom.kernel_size)
    if geom.ndim == 1 and conv1d_core_4d:
        core = (*core, 1)
    return {
        "hada_w1_a": (r, geom.out_features),
        "hada_w1_b": (r, geom.in_features),
        "hada_w2_a": (r, geom.out_features),
        "hada_w2_b": (r, geom.in_features),
        "hada_t1": core,
        "hada_t2": core,
    }


# --------------------------------------------------------------------------------------------
# Khatri-Rao products
# --------------------------------------------------------------------------------------------
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
    """‖ΔW‖_F through the factored form: ‖B A‖_F² = trace((BᵀB)(AAᵀ)), two r²×r² Gram matrices."""
    b, a = lora_factors(factors, scale)
    sq = ((b.T @ b) * (a @ a.T)).sum()  # both Gram matrices are symmetric
    return sq.clamp_min(0).sqrt()


# --------------------------------------------------------------------------------------------
# Materialised ΔW with lean autograd (saves only the factors)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The factored chain
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One linear map of the factored chain.

    ``ndim == 0``: ``h @ weightᵀ`` over the last axis. Else an N-d convolution with these
    parameters, weight ``(c_out, c_in/groups, *k)``.
    """

    ndim: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def pointwise(self, w: torch.Tensor) -> bool:
        """A 1x1 conv with stride 1, no padding, one group: run as a batched matmul.

        On CPU, PyTorch sends 1x1 convs with few channels to its slow im2col kernel (about
        4x the time of the equivalent matmul at 320 ⇄ 64 channels, 32² latent), and the
        matmul form lets the last stage add into the base output with one ``baddbmm``.
        """
        return (
            self.ndim > 0
            and self.groups == 1
            and all(k == 1 for k in w.shape[2:])
            and all(v == 1 for v in self.stride)
            and all(v == 0 for v in self.padding)
            and all(v == 1 for v in self.dilation)
        )

    def forward(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.ndim == 0:
            return F.linear(h, w, bias)
        if self.pointwise(w) and h.dim() == self.ndim + 2 and h.numel() > 0:  # (an empty batch: F.conv)
            b, c_in = h.shape[:2]
            w3 = w.view(1, w.shape[0], c_in).expand(b, -1, -1)  # (B, c_out, c_in); bmm, not matmul,
            out = torch.bmm(w3, h.reshape(b, c_in, -1))  # (B, c_out, S)  (matmul would transpose-copy h)
            if bias is not None:
                out += bias.view(1, -1, 1)
            return out.view(b, w.shape[0], *h.shape[2:])  # (B, c_out, *spatial)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
        return conv(h, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, need_input: bool, need_weight: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.ndim == 0:
            gh = g @ w if need_input else None  # (..., c_in)
            gw = g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1]) if need_weight else None
            return gh, gw
        if self.pointwise(w) and h.dim() == self.ndim + 2 and h.numel() > 0:
            b, c_in, c_out = h.shape[0], h.shape[1], w.shape[0]
            w2 = w.view(c_out, c_in)  # (c_out, c_in)
            g3 = g.reshape(b, c_out, -1)  # (B, c_out, S)
            gh = torch.bmm(w2.T.expand(b, -1, -1), g3).view(h.shape) if need_input else None  # (B, c_in, *spatial)
            gw = None
            if need_weight:
                gw = torch.bmm(g3, h.reshape(b, c_in, -1).transpose(1, 2)).sum(0).view(w.shape)  # (c_out, c_in, 1..)
            return gh, gw
        gh, gw, _ = torch.ops.aten.convolution_backward(
            g, h, w, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * self.ndim, self.groups, [need_input, need_weight, False],
        )
        return gh, gw


class StageChain(torch.autograd.Function):
    """y = base + stage_n(…stage_1(x, W_1)…, W_n), saving x and the intermediates only.

    The intermediates have r1·r2 channels, so for a LoHa chain the saved memory is x (usually
    already saved by the base layer) plus ``N × r²`` values per stage.
    """

    @staticmethod
    def forward(ctx, x, base, stages: tuple[Stage, ...], *weights):  # type: ignore[override]
        hs = [x]
        for stage, w in zip(stages[:-1], weights[:-1]):
            hs.append(stage.forward(hs[-1], w))
        last, w_last = stages[-1], weights[-1]
        if base is not None and last.ndim == 0:
            h2 = hs[-1].reshape(-1, hs[-1].shape[-1])  # (N, r²)
            out = torch.addmm(base.reshape(-1, base.shape[-1]), h2, w_last.T).reshape(base.shape)
        elif base is not None and last.pointwise(w_last) and base.dim() == last.ndim + 2 and base.numel() > 0:
            # 1x1 conv as a batched matmul accumulated into the base output (one baddbmm)
            h = hs[-1]
            b, c_in, c_out = h.shape[0], h.shape[1], w_last.shape[0]
            w3 = w_last.view(1, c_out, c_in).expand(b, c_out, c_in)  # (B, c_out, c_in)
            out = torch.baddbmm(base.reshape(b, c_out, -1), w3, h.reshape(b, c_in, -1)).view(base.shape)
        else:
            out = last.forward(hs[-1], w_last)
            if base is not None:
                out = out.add_(base)
        ctx.stages = stages
        ctx.has_base = base is not None
        ctx.save_for_backward(*hs, *weights)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        stages = ctx.stages
        n = len(stages)
        saved = ctx.saved_tensors
        hs, ws = list(saved[:n]), saved[n:]
        if torch.is_grad_enabled():  # create_graph: rebuild the intermediates so second order sees their inputs
            for i in range(1, n):
                hs[i] = stages[i - 1].forward(hs[i - 1], ws[i - 1])
        gw: list[torch.Tensor | None] = [None] * n
        gh = g
        for i in reversed(range(n)):
            need_in = i > 0 or ctx.needs_input_grad[0]
            gin, gw[i] = stages[i].backward(gh, hs[i], ws[i], need_in, ctx.needs_input_grad[3 + i])
            gh = gin
            if gh is None:
                break
        g_base = g if ctx.has_base and ctx.needs_input_grad[1] else None
        return (gh, g_base, None, *gw)


def apply_stages(
    x: torch.Tensor, stages: Sequence[Stage], weights: Sequence[torch.Tensor], base: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a factored chain through :class:`StageChain` (adds into ``base`` when given)."""
    return StageChain.apply(x, base, tuple(stages), *weights)


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
        triton: Use the Khatri-Rao-fused kernels of :mod:`lohakit.kernels` (same quantities,
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


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or (device_type == "cpu" and torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


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


def factored_stages(
    factors: HadaFactors, geom: Geometry, out_scale: torch.Tensor | float, dtype: torch.dtype
) -> tuple[list[Stage], list[torch.Tensor]]:
    """Build the factored chain for one adapter.

    Args:
        factors: The adapter's factors (float32 parameters).
        geom: Base layer geometry.
        out_scale: Scalar s, or a per-output-channel vector ``(out,)`` (s · rank-dropout mask),
            folded into the last stage's weight rows.
        dtype: Compute dtype (the input's); factors are cast, activations are not.

    Returns:
        ``(stages, weights)`` for :func:`apply_stages`.
    """
    f = factors
    out, g, d = geom.out_features, geom.groups, geom.ndim
    ones = (1,) * d
    if not f.tucker:
        q, p_t = linear_qp(f, out_scale, dtype)  # (R, in/g·K), (R, out)
        p = p_t.T.contiguous()  # (out, R)
        R = q.shape[0]
        if d == 0:
            return [Stage(), Stage()], [q, p]
        q = q.reshape(R, geom.in_features, *geom.kernel_size)  # (R, in/g, *k)
        if g > 1:
            q = q.repeat(g, *([1] * (d + 1)))  # (g·R, in/g, *k)
        first = Stage(d, geom.stride, geom.padding, geom.dilation, g)
        second = Stage(d, ones, (0,) * d, ones, g)
        return [first, second], [q, p.reshape(out, R, *ones)]
    # Tucker: 1x1 (Qb) -> k-conv (core) -> 1x1 (Pa)
    k = geom.kernel_size
    r1, r2 = f.t1.shape[0], f.t2.shape[0]
    qb = khatri_rao_cols(f.w1b, f.w2b).to(dtype)  # (R, in/g)
    pa = (khatri_rao_rows(f.w1a.T, f.w2a.T) * _as_rows(out_scale)).to(dtype)  # (out, R)
    t1 = f.t1.reshape(r1, f.t1.shape[1], *k)
    t2 = f.t2.reshape(r2, f.t2.shape[1], *k)
    core = torch.einsum("pq...,PQ...->pPqQ...", t1, t2)  # (r1, r2, r1', r2', *k)
    core = core.reshape(r1 * r2, -1, *k).to(dtype)  # (R, R, *k)
    R = core.shape[0]
    qb = qb.reshape(R, geom.in_features, *ones)
    if g > 1:
        qb = qb.repeat(g, *([1] * (d + 1)))
        core = core.repeat(g, *([1] * (d + 1)))
    stages = [
        Stage(d, ones, (0,) * d, ones, g),
        Stage(d, geom.stride, geom.padding, geom.dilation, g),
        Stage(d, ones, (0,) * d, ones, g),
    ]
    return stages, [qb, core, pa.reshape(out, R, *ones)]


def apply_delta_weight(x: torch.Tensor, dw: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """x through a materialised ΔW with the base layer's parameters (``dw`` as from delta_weight)."""
    if geom.transposed:
        dw = dw.T
    return Stage(geom.ndim, geom.stride, geom.padding, geom.dilation, geom.groups).forward(x, dw)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
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


def prefer_factored(
    geom: Geometry,
    ranks: tuple[int, int],
    tucker: bool,
    n_out: int,
    n_in: int,
    build_delta: bool = True,
    training: bool = False,
) -> bool:
    """Whether the factored chain is cheaper than materialising ΔW for this call.

    Costs in matmul FLOPs (R = r1·r2, K = prod(kernel), g = groups, dense = out·in/g·K,
    E = :data:`ELEMENTWISE_COST`, B = :data:`FACTORED_COST_BIAS`); the matmul passes are
    m = 2 for a forward call and m = 6 for a training step (forward, dL/dx, dL/dweights)::

        materialised = m·N·dense + [4·max(r)·dense + 2·E·dense]·(4 if training else 1)
        factored     = B·m·(N·R·in·K·g + N·out·R) + E·e·R·(in·K + out)       (flat)
        factored     = B·m·(N_in·R·in·g + N·R²·K·g + N·out·R) + E·e·(R·(in + out) + R²·K)   (Tucker)

    with e = 2 elementwise passes over the Khatri-Rao products for a forward call and 8 for
    a training step (build, rebuild in backward, product-rule gradients). The bracketed ΔW
    build term and the factored Khatri-Rao term vanish when ``build_delta`` is False (both
    cached at inference).

    Crossovers measured on CPU (fp32 training step, factored / materialised time; see
    bench/RESULTS.md): Linear 1024² at r = 8: 0.2–0.45 from 1 to 512 tokens (factored always);
    at r = 32 (R = 1024) factored loses from ~16 tokens up (1.3–1.5). Linear 256² flips
    between r = 8 (0.4) and r = 16 (1.5) at 512 tokens; Linear 64² is materialised at any r.
    3x3 conv 320 ch: factored up to r = 16 at 8² (0.65), tie at r = 16 at 32² (1.0),
    materialised at r = 32; 32-channel convs are materialised from r = 8.

    Args:
        geom: Base layer geometry.
        ranks: (r1, r2).
        tucker: Whether the adapter is in Tucker form.
        n_out: Output positions (tokens, or batch·output pixels).
        n_in: Input positions (for the Tucker 1x1 stage at input resolution).
        build_delta: Count the cost of building ΔW / P and Q (False when cached).
        training: The call will be differentiated (a backward pass follows).
    """
    r1, r2 = ranks
    R = r1 * r2
    K = geom.kernel_numel
    g = geom.groups
    E = ELEMENTWISE_COST
    m = 6 if training else 2
    dense = geom.out_features * geom.flat_in
    materialised = m * n_out * dense
    if build_delta:
        materialised += (4 * max(r1, r2) * dense + 2 * E * dense) * (4 if training else 1)
    if tucker:
        gemm = n_in * R * geom.in_features * g + n_out * R * R * K * g + n_out * geom.out_features * R
        kr = R * (geom.in_features + geom.out_features) + R * R * K
    else:
        gemm = n_out * R * geom.flat_in * g + n_out * geom.out_features * R
        kr = R * (geom.flat_in + geom.out_features)
    factored = FACTORED_COST_BIAS * m * gemm + (E * (8 if training else 2) * kr if build_delta else 0)
    return factored < materialised


# --------------------------------------------------------------------------------------------
# Dropout helpers
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The one entry point layers call
# --------------------------------------------------------------------------------------------
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


def resolve_path(
    path: ComputePath, factors: HadaFactors, geom: Geometry, n_out: int, n_in: int, **cost: bool
) -> ComputePath:
    """``path`` itself, or for ``"auto"`` the cost model's choice (``cost``: prefer_factored's flags)."""
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


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


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


def _prepad(x: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, Geometry]:
    """Apply a non-zero padding mode ('reflect', 'replicate', 'circular') explicitly, as nn.ConvNd does."""
    if geom.padding_mode == "zeros" or geom.ndim == 0:
        return x, geom
    x = F.pad(x, list(geom.explicit_pad), mode=geom.padding_mode)
    return x, replace(geom, padding=(0,) * geom.ndim, padding_mode="zeros")


def _chain_supported(geom: Geometry) -> bool:
    """The chain needs integer padding (an asymmetric 'same' padding falls back)."""
    return not isinstance(geom.padding, str)
