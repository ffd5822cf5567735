"""Build every benchmarked variant of a base module (deep copies, base weights frozen)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from typing import Callable

import torch
import torch.nn as nn

#: Display order; ``lohakit`` is the auto path, the ``lohakit_*`` ones force a path.
ALL_VARIANTS = (
    "floor",
    "peft_lora",
    "peft_loha",
    "lycoris_loha",
    "lycoris_bypass",
    "lohakit",
    "lohakit_factored",
    "lohakit_mweight",
    "lohakit_mat",
    "lohakit_triton",
)

LOHAKIT_PATHS = {
    "lohakit": "auto", "lohakit_factored": "factored", "lohakit_mweight": "merged", "lohakit_mat": "materialised",
    "lohakit_triton": "auto",
}

#: Variants whose calls run with ``LOHAKIT_TRITON=1`` (the opt-in Triton kernels of lohakit.core.kernels).
TRITON_VARIANTS = frozenset({"lohakit_triton"})

#: The package each competitor needs (a variant whose package is missing is left out, with a note).
_NEEDS = {"peft_lora": "peft", "peft_loha": "peft", "lycoris_loha": "lycoris", "lycoris_bypass": "lycoris"}


def available_variants(device: str, wanted: tuple[str, ...] = ALL_VARIANTS) -> tuple[str, ...]:
    """``wanted`` less the variants this machine cannot run (package missing; Triton off CUDA)."""
    from lohakit.core import kernels

    out = []
    for v in wanted:
        pkg = _NEEDS.get(v)
        if pkg is not None and importlib.util.find_spec(pkg) is None:
            logging.getLogger("bench").warning("variant %s skipped: %s is not installed", v, pkg)
            continue
        if v in TRITON_VARIANTS and not kernels.triton_available(device):
            continue  # no GPU (or no triton): nothing to time
        out.append(v)
    return tuple(out)


def with_kernels(variant: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the Triton kernels switched on for :data:`TRITON_VARIANTS` (``fn`` itself otherwise).

    ``python -m bench`` removes ``LOHAKIT_TRITON`` from its environment at start, so every other
    variant runs the torch path.
    """
    if variant not in TRITON_VARIANTS:
        return fn

    def call() -> object:
        os.environ["LOHAKIT_TRITON"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("LOHAKIT_TRITON", None)

    return call


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _peft(kind: str, model: nn.Module, targets: list[str], r: int, alpha: float, effective: bool) -> nn.Module:
    import peft

    if kind == "lora":
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
    else:
        cfg = peft.LoHaConfig(r=r, alpha=alpha, target_modules=targets, use_effective_conv2d=effective, init_weights=False)
    model = peft.inject_adapter_in_model(cfg, model)
    return model


def _lycoris(model: nn.Module, targets: list[str], r: int, alpha: float, effective: bool, bypass: bool) -> nn.Module:
    # LoHaModule wraps one layer by replacing its forward; ``bypass_mode=True`` makes it compute
    # base(x) + ΔW·x (factored for linear layers) instead of rebuilding W + ΔW each call.
    from lycoris.modules.loha import LohaModule

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    mods = []
    for name, mod in list(model.named_modules()):
        if _matches(name, targets) and isinstance(mod, (nn.Linear, nn.Conv2d)):
            lm = LohaModule(
                name.replace(".", "_"), mod, 1.0, lora_dim=r, alpha=alpha, use_tucker=effective, bypass_mode=bypass
            )
            with torch.no_grad():  # LyCORIS zeroes w2_a at init; give it values like the others
                nn.init.normal_(lm.hada_w2_a, std=0.1)
            lm.apply_to()
            mods.append(lm)
    return _LycorisHolder(model, mods)


class _LycorisHolder(nn.Module):
    """Owns the LyCORIS modules (they patch the layers' forward) and calls the model."""

    def __init__(self, model: nn.Module, mods: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.lycoris_modules = nn.ModuleList(mods)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _lohakit(model: nn.Module, targets: list[str], r: int, alpha: float, effective: bool, path: str) -> nn.Module:
    from lohakit import LoHaConfig, LoHaModel

    cfg = LoHaConfig(r=r, alpha=alpha, target_modules=targets, use_effective_conv2d=effective, init_weights=False)
    lm = LoHaModel(model, cfg)
    for _, layer in lm.loha_layers():
        layer.compute_path = path
    return lm


def build_variant(
    variant: str, base: nn.Module, targets: list[str], r: int = 8, alpha: float | None = None, effective: bool = False,
    copy_base: bool = True,
) -> nn.Module:
    """A deep copy of ``base`` with ``variant``'s adapters on every module named in ``targets``.

    Base parameters are frozen; only adapter parameters train (``floor``: none; the caller adds
    the shared trainable scalar). Adapters get non-zero factors so no variant can shortcut ΔW = 0.

    Args:
        variant: One of :data:`ALL_VARIANTS`.
        base: The base module (left untouched).
        targets: Module names (exact or dotted suffix).
        r: Rank.
        alpha: Scale numerator (default r).
        effective: Tucker / effective conv for kernel > 1 convs.
        copy_base: Deep-copy ``base`` first (False: adapt ``base`` itself, for memory runs).
    """
    alpha = float(r if alpha is None else alpha)
    model = copy.deepcopy(base) if copy_base else base
    model.requires_grad_(False)
    builders: dict[str, Callable[[], nn.Module]] = {
        "floor": lambda: model,
        "peft_lora": lambda: _peft("lora", model, targets, r, alpha, effective),
        "peft_loha": lambda: _peft("loha", model, targets, r, alpha, effective),
        "lycoris_loha": lambda: _lycoris(model, targets, r, alpha, effective, bypass=False),
        "lycoris_bypass": lambda: _lycoris(model, targets, r, alpha, effective, bypass=True),
        **{k: (lambda p=p: _lohakit(model, targets, r, alpha, effective, p)) for k, p in LOHAKIT_PATHS.items()},
    }
    if variant not in builders:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(builders)}")
    out = builders[variant]()
    for n, p in out.named_parameters():
        p.requires_grad_(any(tag in n for tag in ("lora_", "hada_")))
    return out


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class WithScalar(nn.Module):
    """``model(x · s)`` with one trainable scalar s = 1, so backward reaches every layer's input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.s)
