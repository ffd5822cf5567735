"""The optional Triton Khatri-Rao kernels (lohakit.core.kernels) against float64 references.

Without CUDA the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` is set here,
before any kernel is first called (``@triton.jit`` reads it when lohakit.core.kernels.triton_kr is
imported, which happens lazily on the first call, so the order in which test modules are
collected does not matter). With CUDA the same tests run compiled on the GPU.

References follow the torch path's conventions (lohakit.core.functional.linear_qp): Q is built in
the factors' dtype, scaled, cast to the activation dtype, and only then multiplied; the
products are then computed exactly in float64.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything decorates the kernels

pytest.importorskip("triton")

from lohakit.core import kernels  # noqa: E402
from lohakit.core.functional import FactoredLinear, khatri_rao_cols  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances per activation dtype, (rtol, atol as a fraction of max|reference|). Outputs in a
# 16-bit dtype are rounded once (≤ 2^-9 relative for bfloat16, 2^-12 for float16) after a
# float32 accumulation; float32 and float64 only see accumulation error.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-8, 1e-4),
    torch.float16: (2**-10, 1e-4),
}
# Factor gradients come back in the factors' dtype (float32, float64 for the float64 case)
# from a float32 (float64) accumulation of the exact activation values.
GRAD_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RANKS = [(1, 3), (3, 16), (16, 8), (5, 16), (8, 1)]  # (16, 8), (5, 16): several rank tiles
SHAPES = [(37, 130), (130, 37), (1, 70)]  # (N, M), never multiples of the blocks
SCALES = ["none", "float", "tensor"]
# each (ranks, scale) pair gets one shape and one layout, cycling, so all of them meet every dtype
CASES = [
    pytest.param(r, sc, (n, m), k % 2 == 1, id=f"r{r[0]}x{r[1]}-{sc}-N{n}M{m}" + ("-strided" if k % 2 else ""))
    for k, (r, sc) in enumerate(itertools.product(RANKS, SCALES))
    for n, m in [SHAPES[k % len(SHAPES)]]
]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Pin float32 GEMMs to IEEE (the kernels follow torch's TF32 setting on CUDA)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(shape: tuple[int, int], dtype: torch.dtype, strided: bool) -> torch.Tensor:
    """A random (rows, cols) tensor; ``strided``: a transposed view of (cols, rows) storage."""
    if strided:
        return torch.randn(shape[::-1], dtype=dtype, device=DEVICE).T
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _factors(r1: int, r2: int, m: int, dtype: torch.dtype, strided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """b1 ``(r1, M)``, b2 ``(r2, M)``; strided: b1 a transposed view (like ``w1a.T``), b2 every other column."""
    b1 = _tensor((r1, m), dtype, strided)
    b2 = torch.randn(r2, 2 * m, dtype=dtype, device=DEVICE)[:, ::2] if strided else _tensor((r2, m), dtype, False)
    return b1, b2


def _scale(kind: str, m: int, dtype: torch.dtype, strided: bool) -> torch.Tensor | float | None:
    if kind == "none":
        return None
    if kind == "float":
        return 0.37
    s = torch.rand(2 * m if strided else m, dtype=dtype, device=DEVICE) + 0.5  # per-column, like s · mask
    s[::3] = 0.0  # rank-dropout zeros
    return s[::2] if strided else s


def _q(b1: torch.Tensor, b2: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    """The torch path's Q_s ``(R, M)`` in the factors' dtype: KR first, then the scale."""
    q = khatri_rao_cols(b1, b2)  # (R, M)
    return q if scale is None else q * scale


def _assert_close(got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]) -> None:
    rtol, atol = tol
    size = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol * size)


# --------------------------------------------------------------------------------------------
# The three kernels against the float64 formula
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("ranks", "scale_kind", "shape", "strided"), CASES)
def test_kr_project(ranks, scale_kind, shape, strided, dtype):
    (r1, r2), (n, m) = ranks, shape
    fdt = _factor_dtype(dtype)
    x = _tensor((n, m), dtype, strided)
    b1, b2 = _factors(r1, r2, m, fdt, strided)
    scale = _scale(scale_kind, m, fdt, strided)
    h = kernels.kr_project(x, b1, b2, scale)
    assert h.shape == (n, r1 * r2) and h.dtype == dtype and h.device == x.device
    ref = x.double() @ _q(b1, b2, scale).to(dtype).double().T  # (N, R): Q cast to x's dtype first
    _assert_close(h, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("ranks", "scale_kind", "shape", "strided"), CASES)
def test_kr_expand(ranks, scale_kind, shape, strided, dtype):
    (r1, r2), (n, m) = ranks, shape
    fdt = _factor_dtype(dtype)
    h = _tensor((n, r1 * r2), dtype, strided)
    b1, b2 = _factors(r1, r2, m, fdt, strided)
    scale = _scale(scale_kind, m, fdt, strided)
    prod = h.double() @ _q(b1, b2, scale).to(dtype).double()  # (N, M)

    y = kernels.kr_expand(h, b1, b2, scale)
    assert y.shape == (n, m) and y.dtype == dtype
    _assert_close(y, prod, TOL[dtype])

    out = _tensor((n, m), dtype, not strided)  # the other layout than h's, to vary strides
    before = out.clone()
    res = kernels.kr_expand(h, b1, b2, scale, out=out)
    assert res is out
    _assert_close(out, before.double() + prod, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("ranks", "scale_kind", "shape", "strided"), CASES)
def test_kr_project_grad(ranks, scale_kind, shape, strided, dtype):
    (r1, r2), (n, m) = ranks, shape
    fdt = _factor_dtype(dtype)
    x = _tensor((n, m), dtype, strided)
    dh = _tensor((n, r1 * r2), dtype, not strided)
    b1, b2 = _factors(r1, r2, m, fdt, strided)
    scale = _scale(scale_kind, m, fdt, strided)
    g1, g2 = kernels.kr_project_grad(dh, x, b1, b2, scale, n_split=2)
    assert g1.shape == (r1, m) and g2.shape == (r2, m) and g1.dtype == g2.dtype == fdt

    dq = dh.double().T @ x.double()  # (R, M), exact products of the given values
    if scale is not None:
        dq = dq * (scale.double() if torch.is_tensor(scale) else scale)
    dq3 = dq.view(r1, r2, m)  # (r1, r2, M)
    _assert_close(g1, (dq3 * b2.double()[None]).sum(1), GRAD_TOL[fdt])
    _assert_close(g2, (dq3 * b1.double()[:, None]).sum(0), GRAD_TOL[fdt])


@pytest.mark.parametrize("n_split", [None, 1, 2, 3, 5, 50])
def test_kr_project_grad_splits_sum_the_same(n_split):
    """Any number of N splits (clamped to the N blocks) gives the same gradients, deterministically."""
    n, m, r1, r2 = 130, 37, 3, 5
    x = torch.randn(n, m, device=DEVICE)
    dh = torch.randn(n, r1 * r2, device=DEVICE)
    b1, b2 = torch.randn(r1, m, device=DEVICE), torch.randn(r2, m, device=DEVICE)
    g1, g2 = kernels.kr_project_grad(dh, x, b1, b2, 0.5, n_split=n_split)
    dq3 = ((dh.double().T @ x.double()) * 0.5).view(r1, r2, m)
    _assert_close(g1, (dq3 * b2.double()[None]).sum(1), GRAD_TOL[torch.float32])
    _assert_close(g2, (dq3 * b1.double()[:, None]).sum(0), GRAD_TOL[torch.float32])
    again = kernels.kr_project_grad(dh, x, b1, b2, 0.5, n_split=n_split)
    assert torch.equal(again[0], g1) and torch.equal(again[1], g2)


def test_single_element_and_empty_inputs():
    x = torch.full((1, 1), 2.0, device=DEVICE)
    b1, b2 = torch.full((1, 1), 3.0, device=DEVICE), torch.full((1, 1), 5.0, device=DEVICE)
    assert kernels.kr_project(x, b1, b2, 0.5).item() == 15.0
    assert kernels.kr_expand(x, b1, b2, 0.5).item() == 15.0
    g1, g2 = kernels.kr_project_grad(x, x, b1, b2)
    assert (g1.item(), g2.item()) == (20.0, 12.0)  # dQ = 4: 4·5, 4·3

    empty = torch.zeros(0, 4, device=DEVICE)
    f1, f2 = torch.randn(2, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    assert kernels.kr_project(empty, f1, f2).shape == (0, 6)
    assert kernels.kr_expand(torch.zeros(0, 6, device=DEVICE), f1, f2).shape == (0, 4)
    g1, g2 = kernels.kr_project_grad(torch.zeros(0, 6, device=DEVICE), empty, f1, f2)
    assert g1.shape == (2, 4) and g2.shape == (3, 4) and not g1.any() and not g2.any()


# --------------------------------------------------------------------------------------------
# The torch path's conventions, bit for bit where a convention decides the result
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.5])
def test_q_is_cast_to_bf16_before_the_product(scale):
    """x = [1, -1] cancels the exact parts: only Q's rounding to bfloat16 survives.

    Q[0] = 1 + 3·2⁻⁹ rounds (to nearest even) to 1 + 2⁻⁷ in bfloat16, so the torch path gives
    2⁻⁷ (times the scale); an uncast fp32 Q would give 3·2⁻⁹, a truncating cast 0.
    """
    bf = torch.bfloat16
    x = torch.tensor([[1.0, -1.0]], dtype=bf, device=DEVICE)  # (1, 2)
    b1 = torch.tensor([[1 + 3 * 2**-9, 1.0]], device=DEVICE)  # (1, 2)
    b2 = torch.ones(1, 2, device=DEVICE)
    torch_path = x @ _q(b1, b2, scale).to(bf).T  # (1, 1)
    assert torch_path.item() == 2**-7 * (scale or 1.0)
    assert torch.equal(kernels.kr_project(x, b1, b2, scale), torch_path)
    # kr_expand: the same cancellation over the rank axis, r1 = 2, r2 = 1
    h = torch.tensor([[1.0, -1.0]], dtype=bf, device=DEVICE)  # (1, R=2)
    a1 = torch.tensor([[1 + 3 * 2**-9], [1.0]], device=DEVICE)  # (2, 1)
    a2 = torch.ones(1, 1, device=DEVICE)
    assert torch.equal(kernels.kr_expand(h, a1, a2, scale), h @ _q(a1, a2, scale).to(bf))


@pytest.mark.parametrize("scale_kind", SCALES)
def test_16bit_factors(scale_kind):
    """bfloat16 factors with float16 activations: Q's products and scale round to bfloat16 as torch's do."""
    n, m, r1, r2 = 37, 70, 3, 5
    x = torch.randn(n, m, dtype=torch.float16, device=DEVICE)
    b1, b2 = _factors(r1, r2, m, torch.bfloat16, strided=True)
    scale = _scale(scale_kind, m, torch.bfloat16, strided=False)
    q = _q(b1, b2, scale).to(torch.float16)  # (R, M): bfloat16 products, then the cast
    _assert_close(kernels.kr_project(x, b1, b2, scale), x.double() @ q.double().T, TOL[torch.float16])
    h = torch.randn(n, r1 * r2, dtype=torch.float16, device=DEVICE)
    _assert_close(kernels.kr_expand(h, b1, b2, scale), h.double() @ q.double(), TOL[torch.float16])
    g1, g2 = kernels.kr_project_grad(h, x, b1, b2, scale)
    assert g1.dtype == g2.dtype == torch.bfloat16
    dq = h.double().T @ x.double()  # (R, M)
    if scale is not None:
        dq = dq * (scale.double() if torch.is_tensor(scale) else scale)
    dq3 = dq.view(r1, r2, m)
    _assert_close(g1, (dq3 * b2.double()[None]).sum(1), TOL[torch.bfloat16])  # one rounding to bfloat16
    _assert_close(g2, (dq3 * b1.double()[:, None]).sum(0), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_composes_to_factored_linear(dtype):
    """The five kernel calls of a LoHa linear forward/backward reproduce FactoredLinear."""
    n, d_in, d_out, r1, r2 = 37, 70, 45, 3, 4
    x = torch.randn(n, d_in, dtype=dtype, device=DEVICE, requires_grad=True)
    base = torch.randn(n, d_out, dtype=dtype, device=DEVICE)
    w1a, w2a = torch.randn(d_out, r1, device=DEVICE), torch.randn(d_out, r2, device=DEVICE)
    w1b, w2b = torch.randn(r1, d_in, device=DEVICE), torch.randn(r2, d_in, device=DEVICE)
    ws = [w.requires_grad_() for w in (w1a, w1b, w2a, w2b)]
    s = 0.25 * (torch.rand(d_out, device=DEVICE) > 0.3).float()  # S = s · rank-dropout mask, (out,)
    g = torch.randn(n, d_out, dtype=dtype, device=DEVICE)
    y = FactoredLinear.apply(x, base, *ws, s)
    y.backward(g)

    with torch.no_grad():
        h = kernels.kr_project(x, w1b, w2b)  # (N, R) = x Qᵀ
        y_k = kernels.kr_expand(h, w1a.T, w2a.T, scale=s, out=base.clone())  # base + h Pᵀ
        dh = kernels.kr_project(g, w1a.T, w2a.T, scale=s)  # (N, R) = G P
        dx = kernels.kr_expand(dh, w1b, w2b)  # dh Q
        g_w1b, g_w2b = kernels.kr_project_grad(dh, x, w1b, w2b)
        g_w1a_t, g_w2a_t = kernels.kr_project_grad(h, g, w1a.T, w2a.T, scale=s)
    # float32: both paths are float32 GEMMs; bfloat16: the torch path also rounds dP and dQ to
    # bfloat16 before contracting them, the kernels keep float32, so allow a few bf16 ulps.
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)
    _assert_close(y_k, y.detach(), tol)
    _assert_close(dx, x.grad, tol)
    for got, ref in zip((g_w1a_t.T, g_w1b, g_w2a_t.T, g_w2b), (w.grad for w in ws)):
        assert got.dtype == torch.float32
        _assert_close(got, ref, tol)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _args(n=4, m=6, r1=2, r2=3):
    x = torch.randn(n, m, device=DEVICE)
    b1, b2 = torch.randn(r1, m, device=DEVICE), torch.randn(r2, m, device=DEVICE)
    return x, b1, b2, torch.randn(n, r1 * r2, device=DEVICE)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda x, b1, b2, h: kernels.kr_project(x[None], b1, b2), ValueError, "x must be 2-D"),
        (lambda x, b1, b2, h: kernels.kr_project(x.int(), b1, b2), ValueError, "x has dtype"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1[:, :5], b2), ValueError, "b1 has shape"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, b2[:, :5]), ValueError, "b2 has shape"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, b2.double()), ValueError, "b1 and b2"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, torch.randn(129, 6, device=DEVICE)), ValueError, "r2=129"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, b2, torch.ones(5, device=DEVICE)), ValueError, "scale"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, b2, True), TypeError, "scale"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1.to("meta"), b2), ValueError, "b1 is on meta"),
        (lambda x, b1, b2, h: kernels.kr_project(x, b1, b2, torch.ones(6, device="meta")), ValueError, "scale is on"),
        (lambda x, b1, b2, h: kernels.kr_expand(h[:, :5], b1, b2), ValueError, "h has shape"),
        (lambda x, b1, b2, h: kernels.kr_expand(h, b1, b2, out=x.double()), ValueError, "out has dtype"),
        (lambda x, b1, b2, h: kernels.kr_expand(h, b1, b2, out=x[:3]), ValueError, "out has shape"),
        (lambda x, b1, b2, h: kernels.kr_project_grad(h[:3], x, b1, b2), ValueError, "dh has shape"),
        (lambda x, b1, b2, h: kernels.kr_project_grad(h.double(), x, b1, b2), ValueError, "dh has dtype"),
        (lambda x, b1, b2, h: kernels.kr_project_grad(h, x, b1, b2, n_split=0), ValueError, "n_split"),
        (lambda x, b1, b2, h: kernels.kr_project_grad(h, x.to("meta"), b1, b2), ValueError, "is on"),
    ],
)
def test_argument_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_args())


# --------------------------------------------------------------------------------------------
# Opt-in policy and lazy import
# --------------------------------------------------------------------------------------------
def test_triton_enabled_is_opt_in(monkeypatch):
    t = torch.zeros(1, device=DEVICE)
    monkeypatch.delenv("LOHAKIT_TRITON", raising=False)
    assert kernels.triton_available(t.device)  # CUDA, or TRITON_INTERPRET=1 set above
    assert not kernels.triton_enabled(t)
    monkeypatch.setenv("LOHAKIT_TRITON", "0")
    assert not kernels.triton_enabled(t)
    monkeypatch.setenv("LOHAKIT_TRITON", "1")
    assert kernels.triton_enabled(t)


def test_triton_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.triton_available("cpu")
    assert kernels.triton_available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_available("cpu")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOHAKIT_TRITON")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_import_lohakit_does_not_import_triton():
    res = _run(
        """
        import sys, torch, lohakit, lohakit.core.functional, lohakit.core.kernels as k
        t = torch.zeros(1)
        print(k.triton_available("cuda"), k.triton_enabled(t))
        assert "triton" not in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))
        """,
        LOHAKIT_TRITON="1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "False"]  # available for CUDA; CPU tensor, no interpreter


def test_works_without_triton_installed():
    res = _run(
        """
        import sys
        sys.modules["triton"] = None  # as if not installed: import triton raises ImportError
        import torch, lohakit, lohakit.core.kernels as k
        assert not k.triton_available("cuda") and not k.triton_enabled(torch.zeros(1))
        try:
            k.kr_project(torch.zeros(2, 2), torch.zeros(1, 2), torch.zeros(1, 2))
        except ImportError:
            print("ImportError")
        """,
        LOHAKIT_TRITON="1",
        TRITON_INTERPRET="1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ImportError"


def test_interpreter_flag_works_after_triton_was_imported():
    """Triton imported first (as another test module or torch may do), the flag set later: the
    kernels still run interpreted, because they are decorated only at their first call."""
    res = _run(
        """
        import os, torch, triton, triton.language
        os.environ["TRITON_INTERPRET"] = "1"
        from lohakit.core import kernels as k
        from lohakit.core.kernels import triton_kr
        assert triton_kr.INTERPRETED
        x, b = torch.ones(3, 5, dtype=torch.bfloat16), torch.ones(2, 5)
        h = k.kr_project(x, b, b, 0.5)
        assert torch.equal(h, torch.full((3, 4), 2.5, dtype=torch.bfloat16))
        assert torch.equal(k.kr_expand(h, b, b, out=x.clone()), torch.full((3, 5), 11.0, dtype=torch.bfloat16))
        g1, g2 = k.kr_project_grad(h, x, b, b)
        assert torch.equal(g1, torch.full((2, 5), 15.0)) and torch.equal(g2, g1)  # Σ_n Σ_j 2.5 = 15
        print("ok")
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_kernels_compile_for_hopper_and_ampere(tmp_path):
    """Without a GPU: compile every kernel to a cubin for sm_90 (the H200 class) and sm_80.

    The interpreter checks neither tl.dot's shape rules (every dimension a power of two ≥ 16)
    nor shared memory; this compiles the specialisations the launchers would build at the
    largest rank tile and small ranks, and checks each fits the architecture's shared memory.
    """
    res = _run(
        """
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lohakit.core.kernels import triton_kr as K

        assert not K.INTERPRETED
        TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
        PTRS = {  # pointer argument -> a(ctivation), f(actor) or e(pilogue) dtype
            "project": ("_kr_project_kernel", dict(x_ptr="a", b1_ptr="f", b2_ptr="f", s_ptr="f", h_ptr="a")),
            "expand": ("_kr_expand_kernel", dict(h_ptr="a", b1_ptr="f", b2_ptr="f", s_ptr="f", y_ptr="a")),
            "grad": ("_kr_project_grad_kernel",
                     dict(dh_ptr="a", x_ptr="a", b1_ptr="f", b2_ptr="f", s_ptr="f", g1_ptr="e", g2_ptr="e")),
        }
        SHARED = {90: 232448, 80: 166912}  # bytes of shared memory one block may use
        f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
        CASES = [  # (arch, activations, factors, r1, r2, scale mode, TF32); float64 r2 = 128: most shared memory
            (90, bf16, f32, 1, 1, 1, False), (90, bf16, f32, 16, 8, 2, False), (90, f16, bf16, 3, 4, 1, False),
            (90, f32, f32, 5, 16, 2, True), (80, f64, f64, 3, 128, 2, False),
        ]
        for cap, act, fac, r1, r2, mode, tf32 in CASES:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for kind, accumulate in (("project", False), ("expand", False), ("expand", True), ("grad", False)):
                meta = K._meta(kind, act, fac, r1, r2, mode, accumulate)
                opts = {k: meta.pop(k) for k in ("num_warps", "num_stages")}
                name, ptrs = PTRS[kind]
                fn = getattr(K, name)
                types = dict(a=TL[act], f=TL[fac], e=TL[K._epilogue_dtype(act, fac)])
                sig = {a: "constexpr" if a in meta else "*" + types[ptrs[a]] if a in ptrs else
                       "fp32" if a == "s_val" else "i32" for a in fn.arg_names}
                k = triton.compile(ASTSource(fn, sig, meta), target=GPUTarget("cuda", cap, 32), options=opts)
                assert k.asm.get("cubin"), (cap, kind, act, r1, r2)
                assert k.metadata.shared <= SHARED[cap], (cap, kind, act, r1, r2, k.metadata.shared)
        print("ok")
        """,
        TRITON_CACHE_DIR=str(tmp_path),
        TRITON_DEFAULT_FP_FUSION="1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"
