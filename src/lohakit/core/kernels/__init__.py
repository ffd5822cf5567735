"""Optional Triton kernels that fuse LoHa's Khatri-Rao products into its GEMMs.

A linear LoHa adapter has ``ΔW = (w1a w1b) ⊙ (w2a w2b) = P Q`` with ``Q = w1b ⊙_col w2b``
``(R, in)`` and ``P = w1a ⊙_row w2a`` ``(out, R)``, ``R = r1·r2``, rank index
``(i, j) -> i·r2 + j``. lohakit's torch path builds P and Q, then runs plain GEMMs. The three
kernels here build the Khatri-Rao tiles in registers instead, so neither P, Q nor dQ is ever
written to memory. With ``Q_s[(i, j), m] = s[m] · b1[i, m] · b2[j, m]``:

* :func:`kr_project` ``(x, b1, b2, scale)`` -> ``h = x Q_sᵀ`` ``(N, R)``.
  Forward ``h = x Qᵀ`` is ``kr_project(x, w1b, w2b)``; backward ``dh = G P`` is
  ``kr_project(G, w1a.T, w2a.T, scale=S)``.
* :func:`kr_expand` ``(h, b1, b2, scale, out)`` -> ``y = h Q_s`` ``(N, M)``, or ``out += h Q_s``.
  Forward ``y = base + h Pᵀ`` is ``kr_expand(h, w1a.T, w2a.T, scale=S, out=base)``; backward
  ``dx (+)= dh Q`` is ``kr_expand(dh, w1b, w2b, out=dx)``.
* :func:`kr_project_grad` ``(dh, x, b1, b2, scale)`` -> ``(g_b1, g_b2)``, the factor gradients
  through ``h = x Q_sᵀ``. ``g_w1b, g_w2b = kr_project_grad(dh, x, w1b, w2b)`` and
  ``g_w1a.T, g_w2a.T = kr_project_grad(h, G, w1a.T, w2a.T, scale=S)``.

Conventions match the torch path (:func:`lohakit.core.functional.linear_qp`): factors are float32
master weights; the Khatri-Rao tile is formed in the factors' dtype, scaled, then cast to the
activation dtype; activations are never cast; GEMMs accumulate in float32 (float64 for float64
activations); factor gradients come back in the factors' dtype. ``S`` (or ``scale``) is a
python float or a per-column tensor ``(M,)`` (the per-output-row scale, with rank dropout).

Policy (one place): triton is an optional dependency and is never imported by
``import lohakit`` or by this module; :mod:`lohakit.core.kernels.triton_kr` (which imports triton
and decorates the kernels) is loaded the first time a kernel is called.

* :func:`triton_available` — triton is installed and the device can run its kernels: a CUDA
  device, or any device when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter; slow, for tests).
* :func:`triton_enabled` — what callers check before taking a kernel path: true only when
  ``LOHAKIT_TRITON=1`` is set **and** triton is available for the tensor's device. The kernels
  are opt-in until a real GPU has timed them against the torch path.

``TRITON_INTERPRET`` must be set before the first kernel call of the process (``@triton.jit``
reads it when the kernels are decorated, at that call); later changes do not affect the loaded
kernels. The kernels avoid Triton's own standard-library jit helpers, so an earlier
``import triton`` (by torch.compile, say) without the flag does not matter.

Limits: activation dtypes float32, bfloat16, float16, float64 (float32 follows
``torch.backends.cuda.matmul.allow_tf32``: TF32 only where torch would use it); factors of one
floating dtype; any ``r1 ≥ 1`` and ``1 ≤ r2 ≤ 128`` (float64 with r2 > 64 needs an
A100/H100-class GPU's shared memory); any N and M; every tensor argument may have any strides
(transposed views). The kernels do not record autograd history: call them from a custom
``autograd.Function``. Fixed block sizes, not yet timed on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["triton_available", "triton_enabled", "kr_project", "kr_expand", "kr_project_grad"]

_ENABLE_ENV = "LOHAKIT_TRITON"
_INTERPRET_ENV = "TRITON_INTERPRET"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    """Whether triton is installed, found without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or stub ``triton`` entry in sys.modules
        return False


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``.

    Args:
        device: The device the tensors live on.

    Returns:
        True when triton is importable and ``device`` is CUDA, or ``TRITON_INTERPRET=1`` is set
        (the interpreter runs on any device, CPU included).
    """
    if not _triton_importable():
        return False
    return torch.device(device).type == "cuda" or os.environ.get(_INTERPRET_ENV) == "1"


def triton_enabled(t: torch.Tensor) -> bool:
    """Whether callers should route ``t``'s computation through the Triton kernels.

    Args:
        t: A tensor of the computation (its device decides).

    Returns:
        True only when ``LOHAKIT_TRITON=1`` is set and :func:`triton_available` holds for
        ``t.device``.
    """
    return os.environ.get(_ENABLE_ENV) == "1" and triton_available(t.device)


def _impl() -> ModuleType:
    """The kernels module, imported (with triton) on first use."""
    from . import triton_kr

    return triton_kr


def kr_project(
    x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Project onto the Khatri-Rao rows: ``h[n, i·r2+j] = Σ_m x[n,m] · s[m] · b1[i,m] · b2[j,m]``.

    The ``Q_sᵀ`` tile ``(BLOCK_M, R)`` is built in registers in the factors' dtype, cast to
    ``x.dtype`` and multiplied with float32 accumulation.

    Args:
        x: ``(N, M)`` activations, float32/bfloat16/float16/float64, any strides.
        b1: ``(r1, M)``, any strides (e.g. ``w1a.T``).
        b2: ``(r2, M)``, same dtype as ``b1``, any strides; ``r2 ≤ 128``.
        scale: None, a float, or an ``(M,)`` tensor ``s``.

    Returns:
        ``h`` ``(N, r1·r2)`` in ``x.dtype``, contiguous.

    Raises:
        ValueError: On a wrong shape, dtype or device, naming the argument.
    """
    return _impl().kr_project(x, b1, b2, scale)


def kr_expand(
    h: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expand from the Khatri-Rao rank: ``y[n, m] = Σ_(i,j) h[n, i·r2+j] · s[m] · b1[i,m] · b2[j,m]``.

    Args:
        h: ``(N, r1·r2)``, float32/bfloat16/float16/float64, any strides.
        b1: ``(r1, M)``, any strides.
        b2: ``(r2, M)``, same dtype as ``b1``, any strides; ``r2 ≤ 128``.
        scale: None, a float, or an ``(M,)`` tensor ``s``.
        out: Optional ``(N, M)`` tensor in ``h.dtype`` (any strides); the product is added into
            it in place (``out += h Q_s``, one rounding) and it is returned.

    Returns:
        ``y`` ``(N, M)`` in ``h.dtype`` (``out`` when given).

    Raises:
        ValueError: On a wrong shape, dtype or device, naming the argument.
    """
    return _impl().kr_expand(h, b1, b2, scale, out)


def kr_project_grad(
    dh: torch.Tensor,
    x: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    *,
    n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor gradients through ``h = x Q_sᵀ`` without materialising ``dQ``.

    ``dQ[(i,j), m] = s[m] Σ_n dh[n, i·r2+j] · x[n, m]`` (float32 accumulation), then
    ``g_b1[i, m] = Σ_j dQ[(i,j), m] · b2[j, m]`` and ``g_b2[j, m] = Σ_i dQ[(i,j), m] · b1[i, m]``,
    contracted in the kernel epilogue. The grid runs over M blocks, i blocks and N splits; each
    split writes its contracted partial, summed by torch afterwards (deterministic, no atomics).

    Args:
        dh: ``(N, r1·r2)`` in ``x.dtype``, any strides.
        x: ``(N, M)``, float32/bfloat16/float16/float64, any strides.
        b1: ``(r1, M)``, any strides.
        b2: ``(r2, M)``, same dtype as ``b1``, any strides; ``r2 ≤ 128``.
        scale: None, a float, or an ``(M,)`` tensor ``s``.
        n_split: How many N splits (default: about two programs per SM on CUDA, one under the
            interpreter); clamped to the number of ``N`` blocks.

    Returns:
        ``(g_b1, g_b2)``, shapes ``(r1, M)`` and ``(r2, M)``, in ``b1.dtype``.

    Raises:
        ValueError: On a wrong shape, dtype or device, naming the argument.
    """
    return _impl().kr_project_grad(dh, x, b1, b2, scale, n_split=n_split)
