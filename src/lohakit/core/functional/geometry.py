"""Geometry and factor types: what the math knows about a base layer and one adapter.

Also the two questions about the running torch that several paths ask (compiling? autocast?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

ComputePath = Literal["auto", "factored", "merged", "materialised"]
#: Every compute path a layer can be set to: the cost model's choice, or one forced path
#: ("merged" where the merged-weight node applies, else "materialised").
COMPUTE_PATHS: tuple[str, ...] = ("auto", "factored", "merged", "materialised")


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


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or (device_type == "cpu" and torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())
