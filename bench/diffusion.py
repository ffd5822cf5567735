"""(f) Diffusion training steps: an SD1-shaped UNet block stack (with convs) and a FLUX-shaped DiT stack.

One AdamW step (forward, MSE loss against a fixed random target, backward, optimizer step over
the adapter parameters) per variant, interleaved in one process as the other suites; peak
memory of the same step in a fresh process per variant (CPU peak RSS, CUDA max allocated).

* **SD1 stack** (``sd1``): ``blocks`` × (diffusers ``ResnetBlock2D`` + ``Transformer2DModel``
  with one ``BasicTransformerBlock``: attn1 self-attention, attn2 cross-attention on a 77-token
  768-wide text context, GEGLU ff; SD1's 1x1-conv ``proj_in``/``proj_out``) at SD1's
  ``down_blocks.0`` widths: 320 channels, 8 heads × 40, 32² latent on CPU (64², i.e. 512 px, on
  GPU). Adapted, as kohya / LyCORIS users train "attn-mlp + conv": ``to_q, to_k, to_v,
  to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out`` and the ResNet 3x3 ``conv1, conv2``
  (conv rank = linear rank).
* **FLUX stack** (``flux``): diffusers ``FluxTransformerBlock`` (double stream) and
  ``FluxSingleTransformerBlock`` in FLUX.1's 1 : 2 ratio, head_dim 128 as FLUX.1, but 4 heads
  (hidden 512; FLUX.1 has 24 heads, hidden 3072) so that a step fits 2 CPU cores; 1024 image
  tokens (a 512-px image: 64² latent packed 2×2) + 128 text tokens, RoPE from ``FluxPosEmbed``.
  Adapted: every attention and MLP projection (``to_q/k/v``, ``to_out.0``, ``add_q/k/v_proj``,
  ``to_add_out``, ``ff(_context).net.0.proj``, ``ff(_context).net.2``, ``proj_mlp``,
  ``proj_out``); the AdaLN modulation linears (``norm*.linear``) are left frozen.

The floor is the frozen stack plus one trainable scalar that scales the latent input (FLUX:
both token streams), so backward runs through every layer as in the other suites; the text
context of SD1's cross-attention stays a constant (a frozen text encoder's output), as in real
training. Widths below FLUX.1's raise the adapters' relative cost: a factored LoHa adds about
``6·N·r²·(in+out)`` FLOPs per layer to the floor's ``4·N·in·out``, i.e. 3072/hidden times more,
relatively, than at FLUX.1's width (see bench/NOTES.md).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import interleaved_medians
from .variants import TRITON_VARIANTS, available_variants, build_variant, trainable, with_kernels

#: The variants this suite runs by default (the forced lohakit paths are for the layer suites).
DIFFUSION_VARIANTS = ("floor", "peft_lora", "peft_loha", "lycoris_loha", "lycoris_bypass", "lohakit")

SD1_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
FLUX_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
]


@dataclass(frozen=True)
class SD1Shape:
    """An SD1 UNet block stack: ``blocks`` × (ResnetBlock2D + Transformer2DModel) at one width."""

    channels: int
    latent: int  # latent height = width
    heads: int
    blocks: int
    batch: int
    text_len: int
    cross_dim: int
    temb_dim: int
    groups: int = 32

    def label(self) -> str:
        return f"SD1 {self.blocks}×(resnet+attn) {self.channels}ch {self.latent}² b{self.batch}"


@dataclass(frozen=True)
class FluxShape:
    """A FLUX DiT stack: ``double`` FluxTransformerBlocks then ``single`` FluxSingleTransformerBlocks."""

    heads: int
    head_dim: int
    double: int
    single: int
    batch: int
    img_hw: tuple[int, int]  # packed image-token grid
    txt_len: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def label(self) -> str:
        h, w = self.img_hw
        return (f"FLUX {self.double}d+{self.single}s hidden {self.hidden} ({self.heads}×{self.head_dim}) "
                f"{h * w}+{self.txt_len} tok b{self.batch}")


SD1_SHAPES = {
    "cpu": SD1Shape(320, 32, 8, 2, 1, 77, 768, 1280),
    "quick": SD1Shape(128, 16, 4, 1, 1, 77, 768, 512),
    "tiny": SD1Shape(32, 8, 2, 1, 1, 8, 32, 32),
    "cuda": SD1Shape(320, 64, 8, 2, 2, 77, 768, 1280),
}
FLUX_SHAPES = {
    "cpu": FluxShape(4, 128, 1, 2, 1, (32, 32), 128),
    "quick": FluxShape(2, 128, 1, 1, 1, (16, 16), 64),
    "tiny": FluxShape(2, 16, 1, 1, 1, (4, 4), 4),
    "cuda": FluxShape(24, 128, 1, 2, 1, (32, 32), 512),
}


class SD1Stack(nn.Module):
    """``blocks`` × (ResnetBlock2D → Transformer2DModel); ``forward(x (B, C, H, W), temb (B, T), ctx (B, L, D))``."""

    def __init__(self, shape: SD1Shape) -> None:
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        c = shape.channels
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=shape.temb_dim, groups=shape.groups, eps=1e-5)
            for _ in range(shape.blocks)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(
                num_attention_heads=shape.heads, attention_head_dim=c // shape.heads, in_channels=c,
                cross_attention_dim=shape.cross_dim, norm_num_groups=shape.groups, use_linear_projection=False,
            )
            for _ in range(shape.blocks)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for res, attn in zip(self.resnets, self.attentions):
            x = res(x, temb)
            x = attn(x, encoder_hidden_states=ctx, return_dict=False)[0]
        return x


class FluxStack(nn.Module):
    """Double- then single-stream FLUX blocks; ``forward(img (B, Ni, H), txt (B, Nt, H), temb (B, H), rope)``."""

    def __init__(self, shape: FluxShape) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        h, n, d = shape.hidden, shape.heads, shape.head_dim
        self.transformer_blocks = nn.ModuleList(FluxTransformerBlock(h, n, d) for _ in range(shape.double))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleTransformerBlock(h, n, d) for _ in range(shape.single))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for blk in self.transformer_blocks:
            txt, img = blk(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        for blk in self.single_transformer_blocks:
            txt, img = blk(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        return img


def flux_rope(shape: FluxShape, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's 3-axis RoPE (cos, sin), each ``(txt_len + h·w, head_dim)``: text ids 0, image ids (0, row, col)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    d = shape.head_dim
    side = (d * 7 // 16) // 2 * 2  # FLUX.1: (16, 56, 56) for head_dim 128
    h, w = shape.img_hw
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    ids = torch.cat([torch.zeros(shape.txt_len, 3), img_ids.reshape(h * w, 3)]).to(device)
    return FluxPosEmbed(theta=10000, axes_dim=[d - 2 * side, side, side])(ids)


def make_stack(stack: str, size: str, device: str) -> tuple[nn.Module, dict, list[str], str, torch.dtype]:
    """(base module, inputs, targets, case label, dtype) for ``stack`` ∈ {sd1, flux} at ``size``.

    ``inputs`` holds the model's tensors (``x``/``temb``/``ctx`` or ``img``/``txt``/``temb``/``rope``);
    the step scales the ``scaled`` entries by its trainable scalar.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    if stack == "sd1":
        sh = SD1_SHAPES[size]
        base = SD1Stack(sh).to(device=device, dtype=dtype)
        inputs = {"x": rnd(sh.batch, sh.channels, sh.latent, sh.latent), "temb": rnd(sh.batch, sh.temb_dim),
                  "ctx": rnd(sh.batch, sh.text_len, sh.cross_dim), "scaled": ("x",)}
        return base, inputs, SD1_TARGETS, sh.label(), dtype
    if stack == "flux":
        sh = FLUX_SHAPES[size]
        base = FluxStack(sh).to(device=device, dtype=dtype)
        h, w = sh.img_hw
        cos, sin = flux_rope(sh, device)
        inputs = {"img": rnd(sh.batch, h * w, sh.hidden), "txt": rnd(sh.batch, sh.txt_len, sh.hidden),
                  "temb": rnd(sh.batch, sh.hidden), "rope": (cos.to(dtype), sin.to(dtype)), "scaled": ("img", "txt")}
        return base, inputs, FLUX_TARGETS, sh.label(), dtype
    raise ValueError(f"unknown stack {stack!r}; expected 'sd1' or 'flux'")


class DiffusionStep:
    """One AdamW step: ``loss = mse(model(inputs with the scaled ones × s), target)``, backward, step."""

    def __init__(self, model: nn.Module, inputs: dict, device: str) -> None:
        self.model = model.train()
        self.inputs = inputs
        first = inputs[inputs["scaled"][0]]
        self.s = nn.Parameter(torch.ones((), device=device, dtype=first.dtype))
        with torch.no_grad():
            out = self.model(**self._args(torch.ones((), device=device, dtype=first.dtype)))
        self.target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, torch.float32)
        self.opt = torch.optim.AdamW([self.s, *trainable(model)], lr=1e-4)

    def _args(self, s: torch.Tensor) -> dict:
        return {k: (v * s if k in self.inputs["scaled"] else v) for k, v in self.inputs.items() if k != "scaled"}

    def __call__(self) -> None:
        out = self.model(**self._args(self.s))
        F.mse_loss(out.float(), self.target).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _size(quick: bool, device: str) -> str:
    return "cuda" if device == "cuda" else ("quick" if quick else "cpu")


def run(quick: bool, device: str, ranks: tuple[int, ...] | None = None, variants: tuple[str, ...] | None = None,
        reps: int | None = None, stacks: tuple[str, ...] = ("sd1", "flux"), size: str | None = None,
        memory: bool = True) -> list[dict]:
    """Median step time and peak memory per (stack, rank, variant); returns table rows.

    Args:
        quick: Smaller shapes, rank 8 only, fewer repetitions.
        device: ``"cpu"`` or ``"cuda"`` (bf16 and the GPU shapes).
        ranks: LoHa / LoRA ranks (alpha = r); default 8, 16, 32.
        variants: Variant names (``floor`` is always added); default :data:`DIFFUSION_VARIANTS`.
        reps: Timed repetitions per variant.
        stacks: Which stacks to run.
        size: Override the shape key (``"tiny"`` for the smoke test).
        memory: Also measure peak memory (one subprocess per variant).

    Returns:
        Rows ``{"suite": "diffusion", "case", "variant", "ms", "ratio", ["peak_mb", "step_mb", "mem_ratio"]}``;
        ``ratio`` is time / floor's time, ``mem_ratio`` peak / floor's peak.
    """
    size = size or _size(quick, device)
    ranks = ranks or ((8,) if quick else (8, 16, 32))
    reps = reps or (4 if quick else 8)
    wanted = variants or DIFFUSION_VARIANTS
    variants = available_variants(device, tuple(dict.fromkeys(("floor", *wanted))))
    rows = []
    for stack in stacks:
        base, inputs, targets, label, _ = make_stack(stack, size, device)
        for r in ranks:
            steps: dict[str, Callable[[], None]] = {
                v: with_kernels(v, DiffusionStep(build_variant(v, base, targets, r), inputs, device)) for v in variants
            }
            med = interleaved_medians(steps, reps=reps, warmup=2, device=device)
            del steps
            gc.collect()
            mem = _peak_memory(stack, size, r, variants, device) if memory else {}
            for v in variants:
                row = {"suite": "diffusion", "case": f"{label} r={r}", "variant": v, "ms": med[v],
                       "ratio": med[v] / med["floor"]}
                if v in mem:
                    row.update(peak_mb=mem[v]["peak_mb"], step_mb=mem[v]["peak_mb"] - mem[v]["before_mb"],
                               mem_ratio=mem[v]["peak_mb"] / mem["floor"]["peak_mb"])
                rows.append(row)
            print(f"[bench] diffusion {stack} r={r}: " + ", ".join(f"{v} {med[v]:.0f} ms" for v in variants),
                  file=sys.stderr)
        del base
    return rows


def _peak_memory(stack: str, size: str, r: int, variants: tuple[str, ...], device: str) -> dict[str, dict]:
    """variant -> ``{"before_mb", "peak_mb"}`` from :func:`worker`, one fresh process per variant."""
    out = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for v in variants:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("LOHAKIT_TRITON", None)
        if v in TRITON_VARIANTS:
            env["LOHAKIT_TRITON"] = "1"
        cmd = [sys.executable, "-m", "bench.diffusion", stack, size, v, str(r), device, "3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"diffusion memory worker for {stack} {v!r} r={r} failed:\n{proc.stderr[-2000:]}")
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def worker(stack: str, size: str, variant: str, r: int, device: str, steps: int) -> dict:
    """Runs in the subprocess: build and adapt the stack, then peak memory over ``steps`` steps.

    ``before_mb`` is the memory after building (model, adapters, inputs, optimizer created but
    without state); ``peak_mb`` the peak while stepping (CPU: VmHWM after a reset, CUDA:
    ``max_memory_allocated``).
    """
    from .memory import measure_peak

    base, inputs, targets, _, _ = make_stack(stack, size, device)
    step = DiffusionStep(build_variant(variant, base, targets, r, copy_base=False), inputs, device)
    return {"variant": variant, **measure_peak(step, device, steps)}


if __name__ == "__main__":
    # threads: inherited through OMP_NUM_THREADS (python -m bench --threads sets it)
    _st, _sz, _v, _r, _d, _n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(json.dumps({**worker(_st, _sz, _v, _r, _d, _n), "shape": asdict(
        (SD1_SHAPES if _st == "sd1" else FLUX_SHAPES)[_sz])}))
