"""Triton kernels that build LoHa's Khatri-Rao products tile by tile inside the GEMMs.

Importing this module imports triton and decorates the kernels; :mod:`lohakit.core.kernels`
imports it only when a kernel is first called. Whether the kernels run compiled (CUDA) or
under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors allowed) is fixed by the
environment at that import, because ``@triton.jit`` reads the flag when it decorates.

With ``s`` an optional per-column scale over the ``M`` axis (``None``, a float, or ``(M,)``)::

    Q[(i, j), m] = s[m] · b1[i, m] · b2[j, m]          (R, M),  R = r1·r2,  (i, j) -> i·r2 + j

    kr_project(x, b1, b2, s)       h = x Qᵀ                                  (N, R)
    kr_expand(h, b1, b2, s, out)   y = h Q   (or out += h Q)                 (N, M)
    kr_project_grad(dh, x, b1, b2, s)
        dQ = s ⊙ (dhᵀ x)   g_b1[i, m] = Σ_j dQ[(i,j), m] b2[j, m]   g_b2[j, m] = Σ_i dQ[(i,j), m] b1[i, m]

Q (or dQ) only ever exists as a register tile. Conventions follow lohakit's torch path: the Q
tile is formed in the factors' dtype (``(b1·b2)·s``), cast to the activation dtype, then fed
to ``tl.dot`` with a float32 accumulator (float64 for float64 inputs); activations are never
cast; factor gradients come back in ``b1``'s dtype.

Tiling. The rank axis R is tiled as ``BI`` rows of ``i`` times all ``R2P = next_pow2(r2)``
columns of ``j`` (a tile of ``RB = BI·R2P`` padded rank slots, masked), so any ``r1`` works and
``r2`` is limited to :data:`MAX_R2`. Every ``tl.dot`` dimension is a power of two ≥ 16 (real
GPUs require it; the interpreter does not check). Block sizes are fixed constants below, not
autotuned (autotune under the interpreter is very slow, and no GPU has timed these yet).
Shared memory per block, compiled for sm_90 at r2 = 128: ≤ 66 KB for float32, ≤ 33 KB for
bfloat16, 132 KB for float64 (too much for sm_86/sm_89, fine on A100/H100-class GPUs).

Interpreter workarounds (Triton 3.9, all behind the ``INTERP`` constexpr, compiled code is
unaffected): its ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584), its
float32 -> bfloat16 cast truncates, and its elementwise bfloat16 ops act on the bits; so under
the interpreter bfloat16 dot operands are widened to float32 (exact), casts to bfloat16 round
to nearest even on the bits, and 16-bit factor products are formed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["kr_project", "kr_expand", "kr_project_grad", "INTERPRETED", "MAX_R2", "SUPPORTED_DTYPES"]

# Fixed tile sizes. Once a GPU has measured them, this is where ``@triton.autotune`` configs
# (keyed on N, M, r1, r2) would replace the constants; keep them powers of two ≥ 16.
PROJECT_BLOCK_N = 64  # rows of x per program
PROJECT_BLOCK_M = 32  # reduction step over M
EXPAND_BLOCK_N = 64  # rows of h per program
EXPAND_BLOCK_M = 64  # output columns per program
GRAD_BLOCK_M = 64  # columns of x (and of the factor gradients) per program
GRAD_BLOCK_N = 32  # reduction step over N
RANK_TILE = 64  # target padded rank slots per tile (BI · R2P), at least 16
MIN_DOT = 16  # smallest tl.dot dimension real GPUs accept
MAX_R2 = 128  # largest r2: a rank tile holds all j of its rows (shared memory bounds it)
NUM_WARPS = 4
NUM_STAGES = 2  # software pipelining depth; 3 would need 1.5x the shared memory

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Activation dtypes the kernels accept (float64 runs tl.dot in float64)."""

_SCALE_NONE, _SCALE_SCALAR, _SCALE_VECTOR = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# Under the interpreter the kernels use only builtins of triton.language and this module's jit
# functions: the jit helpers of Triton's standard library (tl.zeros, tl.sum, ...) are decorated
# when triton.language is first imported, so calling them would need TRITON_INTERPRET set before
# *any* import of triton; this way, set before this module is imported is enough.
@triton.jit
def _sum(v, AXIS: tl.constexpr, INTERP: tl.constexpr):
    """Sum over AXIS. The interpreter reduces with numpy when handed Triton's own sum combiner
    (never calling it); any other combiner runs element by element in Python, far too slowly."""
    if INTERP:
        r = tl.reduce(v, AXIS, tl.standard._sum_combine)
    else:
        r = tl.sum(v, axis=AXIS)
    return r


@triton.jit
def _cast(v, DST: tl.constexpr, INTERP: tl.constexpr):
    """v cast to DST, rounding to nearest even (what compiled Triton and torch do).

    Under the interpreter a float32 -> bfloat16 cast truncates instead and bfloat16 <-> float64
    casts misread the values, so there bfloat16 goes through float32 and is rounded on the bits
    (float64 -> bfloat16 then rounds twice, a last-bit difference at most).
    """
    if INTERP:
        if v.dtype == tl.bfloat16:
            v = v.to(tl.float32)  # exact; the interpreter widens bfloat16 only to float32 correctly
        if DST == tl.bfloat16:
            u = v.to(tl.float32).to(tl.uint32, bitcast=True)
            u = u + (((u >> 16) & 1) + 0x7FFF)  # round the low half to nearest, ties to even
            r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            r = v.to(DST)
    else:
        r = v.to(DST)
    return r


@triton.jit
def _mul(a, b, HALF: tl.constexpr, INTERP: tl.constexpr):
    """a · b rounded once to a's dtype; 16-bit floats multiply in float32, as torch does.

    This also keeps the interpreter right: it stores bfloat16 as raw uint16 and its elementwise
    ops would act on the bit patterns.
    """
    if HALF:
        r = _cast(a.to(tl.float32) * b.to(tl.float32), a.dtype, INTERP)
    else:
        r = a * b
    return r


@triton.jit
def _mul_scalar(a, s, HALF: tl.constexpr, INTERP: tl.constexpr):
    """a · s for a float32 scalar s, rounded once to a's dtype (a: float32 or 16-bit factors)."""
    if HALF:
        r = _cast(a.to(tl.float32) * s, a.dtype, INTERP)
    else:
        r = a * s
    return r


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b. Under the interpreter bfloat16 operands are widened to (exact) float32 first:
    its tl.dot multiplies the bfloat16 bit patterns (triton-lang/triton#11584)."""
    if INTERP:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC_T)


@triton.jit
def _kr_project_kernel(
    x_ptr, b1_ptr, b2_ptr, s_ptr, s_val, h_ptr,
    N, M, r1, r2,
    sxn, sxm, s1r, s1m, s2r, s2m, ss, shn, shr,
    SCALE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BI: tl.constexpr, R2P: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr,
    HALF: tl.constexpr, INTERP: tl.constexpr,
):
    """h[n, (i,j)] = Σ_m x[n,m] · (s[m] b1[i,m] b2[j,m]); grid (N blocks, i blocks)."""
    RB: tl.constexpr = BI * R2P
    pid_n = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_i = pid_i * BI + tl.arange(0, BI)  # (BI,)
    offs_j = tl.arange(0, R2P)  # (R2P,)
    mask_n = offs_n < N
    mask_i = offs_i < r1
    mask_j = offs_j < r2
    rows = offs_n.to(tl.int64)
    acc = tl.full((BLOCK_N, RB), 0.0, ACC_T)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # (BM,)
        mask_m = offs_m < M
        xt = tl.load(x_ptr + rows[:, None] * sxn + offs_m[None, :] * sxm,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # (BN, BM)
        b1t = tl.load(b1_ptr + offs_m[:, None] * s1m + offs_i[None, :] * s1r,
                      mask=mask_m[:, None] & mask_i[None, :], other=0.0)  # (BM, BI)
        b2t = tl.load(b2_ptr + offs_m[:, None] * s2m + offs_j[None, :] * s2r,
                      mask=mask_m[:, None] & mask_j[None, :], other=0.0)  # (BM, R2P)
        qt = _mul(b1t[:, :, None], b2t[:, None, :], HALF, INTERP)  # (BM, BI, R2P), factors' dtype
        if SCALE_MODE == 1:
            qt = _mul_scalar(qt, s_val, HALF, INTERP)
        elif SCALE_MODE == 2:
            sv = _cast(tl.load(s_ptr + offs_m * ss, mask=mask_m, other=0.0), qt.dtype, INTERP)  # (BM,)
            qt = _mul(qt, sv[:, None, None], HALF, INTERP)
        qt = _cast(tl.reshape(qt, (BLOCK_M, RB)), xt.dtype, INTERP)  # (BM, RB): Qᵀ tile in x's dtype
        acc = _mma(xt, qt, acc, DOT_PREC, ACC_T, INTERP)  # (BN, RB)
    cols = tl.reshape(offs_i[:, None] * r2 + offs_j[None, :], (RB,))  # real column of each slot
    cmask = tl.reshape(mask_i[:, None] & mask_j[None, :], (RB,))
    tl.store(h_ptr + rows[:, None] * shn + cols[None, :] * shr, _cast(acc, h_ptr.dtype.element_ty, INTERP),
             mask=mask_n[:, None] & cmask[None, :])


@triton.jit
def _kr_expand_kernel(
    h_ptr, b1_ptr, b2_ptr, s_ptr, s_val, y_ptr,
    N, M, r1, r2, n_iblocks,
    shn, shr, s1r, s1m, s2r, s2m, ss, syn, sym,
    SCALE_MODE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BI: tl.constexpr, R2P: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr,
    HALF: tl.constexpr, INTERP: tl.constexpr,
):
    """y[n, m] (+)= Σ_(i,j) h[n,(i,j)] · s[m] b1[i,m] b2[j,m]; grid (N blocks, M blocks)."""
    RB: tl.constexpr = BI * R2P
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_j = tl.arange(0, R2P)  # (R2P,)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_j = offs_j < r2
    rows = offs_n.to(tl.int64)
    b2t = tl.load(b2_ptr + offs_j[:, None] * s2r + offs_m[None, :] * s2m,
                  mask=mask_j[:, None] & mask_m[None, :], other=0.0)  # (R2P, BM)
    if SCALE_MODE == 2:
        sv = _cast(tl.load(s_ptr + offs_m * ss, mask=mask_m, other=0.0), b2t.dtype, INTERP)  # (BM,)
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, ACC_T)
    for ib in range(0, n_iblocks):
        offs_i = ib * BI + tl.arange(0, BI)  # (BI,)
        mask_i = offs_i < r1
        cols = tl.reshape(offs_i[:, None] * r2 + offs_j[None, :], (RB,))
        cmask = tl.reshape(mask_i[:, None] & mask_j[None, :], (RB,))
        ht = tl.load(h_ptr + rows[:, None] * shn + cols[None, :] * shr,
                     mask=mask_n[:, None] & cmask[None, :], other=0.0)  # (BN, RB)
        b1t = tl.load(b1_ptr + offs_i[:, None] * s1r + offs_m[None, :] * s1m,
                      mask=mask_i[:, None] & mask_m[None, :], other=0.0)  # (BI, BM)
        q = _mul(b1t[:, None, :], b2t[None, :, :], HALF, INTERP)  # (BI, R2P, BM), factors' dtype
        if SCALE_MODE == 1:
            q = _mul_scalar(q, s_val, HALF, INTERP)
        elif SCALE_MODE == 2:
            q = _mul(q, sv[None, None, :], HALF, INTERP)
        q = _cast(tl.reshape(q, (RB, BLOCK_M)), ht.dtype, INTERP)  # (RB, BM): Q tile in h's dtype
        acc = _mma(ht, q, acc, DOT_PREC, ACC_T, INTERP)  # (BN, BM)
    y_ptrs = y_ptr + rows[:, None] * syn + offs_m[None, :] * sym
    ymask = mask_n[:, None] & mask_m[None, :]
    if ACCUMULATE:
        acc += _cast(tl.load(y_ptrs, mask=ymask, other=0.0), ACC_T, INTERP)
    tl.store(y_ptrs, _cast(acc, y_ptr.dtype.element_ty, INTERP), mask=ymask)


@triton.jit
def _kr_project_grad_kernel(
    dh_ptr, x_ptr, b1_ptr, b2_ptr, s_ptr, s_val, g1_ptr, g2_ptr,
    N, M, r1, r2, rows_per_split, n_iblocks,
    sdn, sdr, sxn, sxm, s1r, s1m, s2r, s2m, ss,
    SCALE_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BI: tl.constexpr, R2P: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr,
    EPI_T: tl.constexpr, INTERP: tl.constexpr,
):
    """Partial factor gradients of one (M block, i block, N split); grid in that order.

    Writes g1 partial ``(BI, BM)`` into ``g1[split, i, m]`` (buffer ``(splits, r1, M)``) and the
    g2 partial ``(R2P, BM)`` into ``g2[split·n_iblocks + i_block, j, m]`` (buffer
    ``(splits·n_iblocks, r2, M)``); the caller sums the partials.
    """
    RB: tl.constexpr = BI * R2P
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_i = pid_i * BI + tl.arange(0, BI)  # (BI,)
    offs_j = tl.arange(0, R2P)  # (R2P,)
    mask_m = offs_m < M
    mask_i = offs_i < r1
    mask_j = offs_j < r2
    cols = tl.reshape(offs_i[:, None] * r2 + offs_j[None, :], (RB,))
    cmask = tl.reshape(mask_i[:, None] & mask_j[None, :], (RB,))
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    acc = tl.full((RB, BLOCK_M), 0.0, ACC_T)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        mask_n = offs_n < n_end
        rows = offs_n.to(tl.int64)
        dht = tl.load(dh_ptr + cols[:, None] * sdr + rows[None, :] * sdn,
                      mask=cmask[:, None] & mask_n[None, :], other=0.0)  # (RB, BN): dhᵀ tile
        xt = tl.load(x_ptr + rows[:, None] * sxn + offs_m[None, :] * sxm,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # (BN, BM)
        acc = _mma(dht, xt, acc, DOT_PREC, ACC_T, INTERP)  # (RB, BM): dQ tile
    dq = _cast(acc, EPI_T, INTERP)
    if SCALE_MODE == 1:
        dq = dq * s_val  # float32 scalar; EPI_T is float32 or float64
    elif SCALE_MODE == 2:
        sv = _cast(tl.load(s_ptr + offs_m * ss, mask=mask_m, other=0.0), EPI_T, INTERP)  # (BM,)
        dq = dq * sv[None, :]
    dq3 = tl.reshape(dq, (BI, R2P, BLOCK_M))  # (BI, R2P, BM)
    b1t = _cast(tl.load(b1_ptr + offs_i[:, None] * s1r + offs_m[None, :] * s1m,
                        mask=mask_i[:, None] & mask_m[None, :], other=0.0), EPI_T, INTERP)  # (BI, BM)
    b2t = _cast(tl.load(b2_ptr + offs_j[:, None] * s2r + offs_m[None, :] * s2m,
                        mask=mask_j[:, None] & mask_m[None, :], other=0.0), EPI_T, INTERP)  # (R2P, BM)
    g1 = _sum(dq3 * b2t[None, :, :], 1, INTERP)  # (BI, BM)
    g2 = _sum(dq3 * b1t[:, None, :], 0, INTERP)  # (R2P, BM)
    base1 = pid_s.to(tl.int64) * r1 * M
    tl.store(g1_ptr + base1 + offs_i[:, None].to(tl.int64) * M + offs_m[None, :], g1,
             mask=mask_i[:, None] & mask_m[None, :])
    base2 = (pid_s.to(tl.int64) * n_iblocks + pid_i) * r2 * M
    tl.store(g2_ptr + base2 + offs_j[:, None].to(tl.int64) * M + offs_m[None, :], g2,
             mask=mask_j[:, None] & mask_m[None, :])


INTERPRETED: bool = not isinstance(_kr_project_kernel, triton.runtime.JITFunction)
"""Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


# --------------------------------------------------------------------------------------------
# Launch helpers and validation
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rank_tiling(r1: int, r2: int) -> tuple[int, int, int]:
    """(BI, R2P, n_iblocks): rank tile of BI rows of i times R2P padded j, product ≥ 16."""
    r2p = _next_pow2(r2)
    bi = min(max(1, RANK_TILE // r2p), _next_pow2(r1))
    bi = max(bi, MIN_DOT // r2p)  # pad tiny ranks up so the tile is a legal dot dimension
    return bi, r2p, triton.cdiv(r1, bi)


def _check_2d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like the other arguments")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"tensors are on {device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before lohakit.core.kernels first loads triton"
        )


def _check_act_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"{name} has dtype {t.dtype}; the kernels support {names}")


def _check_factors(b1: object, b2: object, m: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    b1, b2 = _check_2d("b1", b1), _check_2d("b2", b2)
    if b1.shape[1] != m:
        raise ValueError(f"b1 has shape {tuple(b1.shape)}; expected (r1, {m}) to match {what}")
    if b2.shape[1] != m:
        raise ValueError(f"b2 has shape {tuple(b2.shape)}; expected (r2, {m}) to match {what}")
    if not b1.dtype.is_floating_point or b1.dtype != b2.dtype:
        raise ValueError(f"b1 and b2 must share one floating dtype, got {b1.dtype} and {b2.dtype}")
    if b1.shape[0] < 1 or b2.shape[0] < 1:
        raise ValueError(f"ranks must be ≥ 1, got r1={b1.shape[0]}, r2={b2.shape[0]}")
    if b2.shape[0] > MAX_R2:
        raise ValueError(f"b2 has r2={b2.shape[0]} rows; the kernels accept r2 ≤ {MAX_R2}")
    return b1, b2


def _scale_args(
    scale: torch.Tensor | float | None, m: int, b1: torch.Tensor
) -> tuple[int, torch.Tensor, float, int]:
    """(mode, pointer tensor, scalar value, stride) for the kernels' scale arguments.

    A float scale is passed by value (float32) unless the factors are float64, where it becomes
    a stride-0 float64 vector so that it is not rounded to float32.
    """
    if scale is None:
        return _SCALE_NONE, b1, 0.0, 0
    if isinstance(scale, torch.Tensor):
        if scale.shape != (m,):
            raise ValueError(f"scale has shape {tuple(scale.shape)}; expected ({m},) or a float")
        if not scale.dtype.is_floating_point:
            raise ValueError(f"scale must be floating point, got {scale.dtype}")
        if scale.device != b1.device:
            raise ValueError(f"scale is on {scale.device}, expected {b1.device} like the other arguments")
        return _SCALE_VECTOR, scale, 0.0, scale.stride(0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, a float or a ({m},) tensor, got {type(scale).__name__}")
    if b1.dtype == torch.float64:
        return _SCALE_VECTOR, torch.full((1,), float(scale), dtype=torch.float64, device=b1.device), 0.0, 0
    return _SCALE_SCALAR, b1, float(scale), 0


def _dot_config(dtype: torch.dtype) -> tuple[str, tl.dtype]:
    """(input_precision, accumulator dtype) for tl.dot on operands of ``dtype``.

    float32 follows torch's own matmul setting (TF32 only where torch would use it, on CUDA).
    """
    if dtype == torch.float64:
        return "ieee", tl.float64
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
        return "tf32", tl.float32
    return "ieee", tl.float32


def _meta(
    kernel: str, act: torch.dtype, factor: torch.dtype, r1: int, r2: int, scale_mode: int, accumulate: bool = False
) -> dict:
    """The compile-time arguments (constexprs, warps, stages) of one kernel specialisation.

    Args:
        kernel: ``"project"``, ``"expand"`` or ``"grad"``.
        act: The activation dtype (x, h, dh).
        factor: The factors' dtype.
        r1, r2: The ranks.
        scale_mode: 0 none, 1 float scalar, 2 vector.
        accumulate: ``kr_expand`` with ``out``.
    """
    bi, r2p, _ = _rank_tiling(r1, r2)
    prec, acc_t = _dot_config(act)
    meta = dict(SCALE_MODE=scale_mode, BI=bi, R2P=r2p, DOT_PREC=prec, ACC_T=acc_t, INTERP=INTERPRETED,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if kernel == "project":
        meta.update(BLOCK_N=PROJECT_BLOCK_N, BLOCK_M=PROJECT_BLOCK_M, HALF=factor in (torch.float16, torch.bfloat16))
    elif kernel == "expand":
        meta.update(BLOCK_N=EXPAND_BLOCK_N, BLOCK_M=EXPAND_BLOCK_M, HALF=factor in (torch.float16, torch.bfloat16),
                    ACCUMULATE=accumulate)
    else:
        meta.update(BLOCK_M=GRAD_BLOCK_M, BLOCK_N=GRAD_BLOCK_N, EPI_T=_TL_DTYPES[_epilogue_dtype(act, factor)])
    return meta


def _epilogue_dtype(act: torch.dtype, factor: torch.dtype) -> torch.dtype:
    """The dtype kr_project_grad contracts dQ and sums partials in."""
    return torch.float64 if torch.float64 in (act, factor) else torch.float32


# --------------------------------------------------------------------------------------------
# Launchers (documented in lohakit.core.kernels)
# --------------------------------------------------------------------------------------------
def kr_project(
    x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """h = x Qᵀ ``(N, r1·r2)`` in x's dtype; see :func:`lohakit.core.kernels.kr_project`."""
    x = _check_2d("x", x)
    _check_act_dtype("x", x)
    n, m = x.shape
    b1, b2 = _check_factors(b1, b2, m, f"x's {m} columns")
    _check_device(x.device, b1=b1, b2=b2)
    r1, r2 = b1.shape[0], b2.shape[0]
    mode, s_t, s_val, s_stride = _scale_args(scale, m, b1)
    if n == 0 or m == 0:
        return x.new_zeros((n, r1 * r2))  # (N, R): empty sum
    h = torch.empty((n, r1 * r2), dtype=x.dtype, device=x.device)  # (N, R)
    n_ib = _rank_tiling(r1, r2)[2]
    grid = (triton.cdiv(n, PROJECT_BLOCK_N), n_ib)
    _kr_project_kernel[grid](
        x, b1, b2, s_t, s_val, h,
        n, m, r1, r2,
        x.stride(0), x.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1), s_stride,
        h.stride(0), h.stride(1),
        **_meta("project", x.dtype, b1.dtype, r1, r2, mode),
    )
    return h


def kr_expand(
    h: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h Q ``(N, M)`` in h's dtype, or ``out += h Q``; see :func:`lohakit.core.kernels.kr_expand`."""
    h = _check_2d("h", h)
    _check_act_dtype("h", h)
    b1 = _check_2d("b1", b1)
    m = b1.shape[1]
    b1, b2 = _check_factors(b1, b2, m, "b1's columns")
    r1, r2 = b1.shape[0], b2.shape[0]
    n = h.shape[0]
    if h.shape[1] != r1 * r2:
        raise ValueError(f"h has shape {tuple(h.shape)}; expected (N, {r1 * r2}) = (N, r1·r2) for r1={r1}, r2={r2}")
    if out is not None:
        out = _check_2d("out", out)
        if out.shape != (n, m):
            raise ValueError(f"out has shape {tuple(out.shape)}; expected ({n}, {m})")
        if out.dtype != h.dtype:
            raise ValueError(f"out has dtype {out.dtype}; expected h's dtype {h.dtype}")
    _check_device(h.device, b1=b1, b2=b2, out=out)
    mode, s_t, s_val, s_stride = _scale_args(scale, m, b1)
    y = out if out is not None else torch.empty((n, m), dtype=h.dtype, device=h.device)  # (N, M)
    if n == 0 or m == 0:
        return y
    n_ib = _rank_tiling(r1, r2)[2]
    grid = (triton.cdiv(n, EXPAND_BLOCK_N), triton.cdiv(m, EXPAND_BLOCK_M))
    _kr_expand_kernel[grid](
        h, b1, b2, s_t, s_val, y,
        n, m, r1, r2, n_ib,
        h.stride(0), h.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1), s_stride,
        y.stride(0), y.stride(1),
        **_meta("expand", h.dtype, b1.dtype, r1, r2, mode, accumulate=out is not None),
    )
    return y


def _default_splits(n: int, grid_m: int, n_ib: int, device: torch.device) -> int:
    """N splits so that about two programs per SM run (CUDA); one under the interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n, GRAD_BLOCK_N), triton.cdiv(2 * sms, grid_m * n_ib)))


def kr_project_grad(
    dh: torch.Tensor,
    x: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    *,
    n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_b1 ``(r1, M)``, g_b2 ``(r2, M)``) in b1's dtype; see :func:`lohakit.core.kernels.kr_project_grad`."""
    dh, x = _check_2d("dh", dh), _check_2d("x", x)
    _check_act_dtype("x", x)
    if dh.dtype != x.dtype:
        raise ValueError(f"dh has dtype {dh.dtype}; expected x's dtype {x.dtype}")
    n, m = x.shape
    b1, b2 = _check_factors(b1, b2, m, f"x's {m} columns")
    r1, r2 = b1.shape[0], b2.shape[0]
    if dh.shape != (n, r1 * r2):
        raise ValueError(f"dh has shape {tuple(dh.shape)}; expected ({n}, {r1 * r2}) = (N, r1·r2) for r1={r1}, r2={r2}")
    _check_device(x.device, dh=dh, b1=b1, b2=b2)
    if n_split is not None and (isinstance(n_split, bool) or not isinstance(n_split, int) or n_split < 1):
        raise ValueError(f"n_split must be a positive int or None, got {n_split!r}")
    mode, s_t, s_val, s_stride = _scale_args(scale, m, b1)
    if n == 0 or m == 0:
        return b1.new_zeros((r1, m)), b2.new_zeros((r2, m))  # empty sums
    n_ib = _rank_tiling(r1, r2)[2]
    epi = _epilogue_dtype(x.dtype, b1.dtype)
    grid_m = triton.cdiv(m, GRAD_BLOCK_M)
    splits = n_split if n_split is not None else _default_splits(n, grid_m, n_ib, x.device)
    blocks = triton.cdiv(n, GRAD_BLOCK_N)
    splits = min(splits, blocks)
    rows_per_split = triton.cdiv(blocks, splits) * GRAD_BLOCK_N
    splits = triton.cdiv(n, rows_per_split)  # no empty split
    g1 = torch.empty((splits, r1, m), dtype=epi, device=x.device)  # (S, r1, M) partials
    g2 = torch.empty((splits * n_ib, r2, m), dtype=epi, device=x.device)  # (S·n_ib, r2, M) partials
    _kr_project_grad_kernel[(grid_m, n_ib, splits)](
        dh, x, b1, b2, s_t, s_val, g1, g2,
        n, m, r1, r2, rows_per_split, n_ib,
        dh.stride(0), dh.stride(1), x.stride(0), x.stride(1),
        b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1), s_stride,
        **_meta("grad", x.dtype, b1.dtype, r1, r2, mode),
    )
    g_b1 = (g1[0] if splits == 1 else g1.sum(0)).to(b1.dtype)  # (r1, M)
    g_b2 = (g2[0] if g2.shape[0] == 1 else g2.sum(0)).to(b1.dtype)  # (r2, M)
    return g_b1, g_b2
