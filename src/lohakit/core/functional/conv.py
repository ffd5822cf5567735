"""Convolutions as GEMM stages, and the factored conv chain.

A conv adapter ΔW x runs as a chain of convolutions: Q as a k-sized kernel then a 1x1 conv
with P (flat), or 1x1 → core → 1x1 (Tucker). :class:`StageChain` runs any chain saving only
its inputs; :func:`apply_delta_weight` runs a materialised ΔW with the base layer's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .delta import _as_rows, khatri_rao_cols, khatri_rao_rows, linear_qp
from .geometry import Geometry, HadaFactors


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


def _prepad(x: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, Geometry]:
    """Apply a non-zero padding mode ('reflect', 'replicate', 'circular') explicitly, as nn.ConvNd does."""
    if geom.padding_mode == "zeros" or geom.ndim == 0:
        return x, geom
    x = F.pad(x, list(geom.explicit_pad), mode=geom.padding_mode)
    return x, replace(geom, padding=(0,) * geom.ndim, padding_mode="zeros")


def _chain_supported(geom: Geometry) -> bool:
    """The chain needs integer padding (an asymmetric 'same' padding falls back)."""
    return not isinstance(geom.padding, str)
