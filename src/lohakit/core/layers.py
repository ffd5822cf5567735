"""LoHa layers: thin ``nn.Module`` wrappers around a base layer. The math is in :mod:`functional`.

One :class:`LoHaLayer` class serves every supported base type; what differs between types is
only how their geometry is read (:data:`GEOMETRY_READERS`, a dict from base type to reader).
The named subclasses (:class:`Linear`, :class:`Conv2d`, …) exist so that ``layers_mapping``
reads like PEFT's and ``isinstance`` checks keep working.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import functional as Fn
from .functional import ComputePath, Geometry, HadaFactors

__all__ = ["LoHaLayer", "Linear", "Conv1d", "Conv2d", "Conv3d", "HFConv1D", "GEOMETRY_READERS", "supported_base_types"]

ADAPTER_PARAM_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

#: Number of torch.optim steps taken in this process: part of the inference-cache key, because
#: fused optimizers (AdamW(fused=True), the HF Trainer default) do not bump version counters.
_OPTIMIZER_STEPS = [0]


#: torch's registry of global forward hooks (the dict object itself; it is mutated, never rebound).
_GLOBAL_FORWARD_HOOKS = nn.modules.module._global_forward_hooks


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


# ------------------------------------------------------------------------------------------
# Geometry readers: base type -> Geometry
# ------------------------------------------------------------------------------------------
def _linear_geometry(m: nn.Linear) -> Geometry:
    return Geometry(out_features=m.out_features, in_features=m.in_features)


def _hf_conv1d_geometry(m: nn.Module) -> Geometry:
    # transformers' Conv1D (GPT-2): y = x @ W + b with W of shape (in, out)
    n_in, n_out = m.weight.shape
    return Geometry(out_features=n_out, in_features=n_in, transposed=True)


def _conv_padding(m: nn.modules.conv._ConvNd) -> tuple[int, ...] | str:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0,) * len(m.kernel_size)
        # 'same' (stride 1): symmetric only when every d·(k-1) is even, else the chain falls back
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if all(t % 2 == 0 for t in total):
            return tuple(t // 2 for t in total)
        return m.padding  # type: ignore[return-value]
    return tuple(m.padding)


def _conv_geometry(m: nn.modules.conv._ConvNd) -> Geometry:
    return Geometry(
        out_features=m.out_channels,
        in_features=m.in_channels // m.groups,
        kernel_size=tuple(m.kernel_size),
        stride=tuple(m.stride),
        padding=_conv_padding(m),
        dilation=tuple(m.dilation),
        groups=m.groups,
        padding_mode=m.padding_mode,
        explicit_pad=tuple(m._reversed_padding_repeated_twice) if m.padding_mode != "zeros" else (),
    )


GEOMETRY_READERS: dict[type, Callable[[Any], Geometry]] = {
    nn.Linear: _linear_geometry,
    nn.Conv1d: _conv_geometry,
    nn.Conv2d: _conv_geometry,
    nn.Conv3d: _conv_geometry,
}


def _hf_conv1d_type() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def supported_base_types() -> dict[type, Callable[[Any], Geometry]]:
    """The base types LoHa can wrap (transformers' Conv1D when transformers is imported)."""
    readers = dict(GEOMETRY_READERS)
    hf = _hf_conv1d_type()
    if hf is not None:
        readers[hf] = _hf_conv1d_geometry
    return readers


def geometry_of(base: nn.Module) -> Geometry | None:
    """Geometry of a supported base layer (exact type first, then subclasses), else None."""
    readers = supported_base_types()
    reader = readers.get(type(base))
    if reader is None:
        reader = next((r for t, r in readers.items() if isinstance(base, t)), None)
    return reader(base) if reader is not None else None


# ------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------
class LoHaLayer(nn.Module):
    """A base layer plus any number of named LoHa adapters.

    Parameters live in one ``nn.ParameterDict`` per factor, keyed by adapter name, so the
    state-dict keys read ``<path>.hada_w1_a.<adapter>`` as in PEFT.

    Args:
        base_layer: The wrapped layer (nn.Linear, nn.Conv1d/2d/3d, transformers Conv1D).
        module_name: Its path in the model, for error messages.
    """

    adapter_layer_names = ADAPTER_PARAM_NAMES
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        geom = geometry_of(base_layer)
        if geom is None:
            raise TypeError(
                f"LoHa cannot wrap module {module_name or '<unnamed>'!r} of type {type(base_layer).__name__}; "
                f"supported types: {sorted(t.__name__ for t in supported_base_types())}"
            )
        self.base_layer = base_layer
        self.geometry = geom
        self.module_name = module_name
        for name in ADAPTER_PARAM_NAMES:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        #: "auto" (cost model), "factored" or "materialised"; tests and benchmarks force one.
        self.compute_path: ComputePath = "auto"
        #: Inference cache: adapter -> (key, prepared weights); see :meth:`_eval_cache_for`.
        self._eval_cache: dict[str, tuple[tuple, dict]] = {}

    # ---------------------------------------------------------------- state
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.hada_w1_a.keys())

    def factors(self, adapter_name: str) -> HadaFactors:
        """The adapter's factor tensors as a :class:`~lohakit.core.functional.HadaFactors`."""
        # Read the ParameterDicts' own tables: this runs on every forward call, and going through
        # nn.Module.__getattr__ and ParameterDict.__getitem__ six times costs more than a 1-token GEMV.
        mods = self._modules
        return HadaFactors(
            mods["hada_w1_a"]._parameters[adapter_name],
            mods["hada_w1_b"]._parameters[adapter_name],
            mods["hada_w2_a"]._parameters[adapter_name],
            mods["hada_w2_b"]._parameters[adapter_name],
            mods["hada_t1"]._parameters.get(adapter_name),
            mods["hada_t2"]._parameters.get(adapter_name),
        )

    def is_tucker(self, adapter_name: str) -> bool:
        return adapter_name in self.hada_t1

    # ---------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: bool | str = True,
        use_effective_conv2d: bool = False,
        rank_dropout_scale: bool = True,
        device: torch.device | str | None = None,
        **_: Any,
    ) -> None:
        """Create (or re-create) adapter ``adapter_name`` on this layer.

        Args:
            adapter_name: Adapter key.
            r: Rank; ``alpha / r`` is the scale.
            alpha: Scale numerator.
            rank_dropout, module_dropout: Training-time dropouts (see LoHaConfig).
            init_weights: True (ΔW = 0), False (random) or "lycoris".
            use_effective_conv2d: Tucker form for convs with kernel > 1.
            rank_dropout_scale: Rescale the rank-dropout mask by its mean.
            device: Where to create the factors (``"meta"`` for low_cpu_mem_usage);
                default: the base weight's device.
        """
        if r <= 0:
            raise ValueError(f"{self.module_name}: rank r must be positive, got {r}")
        geom = self.geometry
        tucker = bool(use_effective_conv2d) and geom.ndim > 0 and geom.kernel_numel > 1
        shapes = Fn.factor_shapes(geom, r, tucker)
        if device is None:
            device = self.base_layer.weight.device
        self._drop_params(adapter_name)
        self.clear_eval_cache()
        for name, shape in shapes.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.module_dropout[adapter_name] = module_dropout
        self.rank_dropout_scale[adapter_name] = rank_dropout_scale
        if str(device) != "meta":
            self.reset_adapter_parameters(adapter_name, init_weights)
        self._refresh_requires_grad()

    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool | str = True) -> None:
        """Initialise the factors: PEFT's init (ΔW = 0), all random, or LyCORIS' init."""
        f = {name: getattr(self, name)[adapter_name] for name in ADAPTER_PARAM_NAMES if adapter_name in getattr(self, name)}
        self.clear_eval_cache()
        with torch.no_grad():
            if init_weights == "lycoris":
                nn.init.normal_(f["hada_w1_a"], std=0.1)
                nn.init.normal_(f["hada_w1_b"], std=1.0)
                nn.init.zeros_(f["hada_w2_a"])
                nn.init.normal_(f["hada_w2_b"], std=1.0)
                for t in ("hada_t1", "hada_t2"):
                    if t in f:
                        nn.init.normal_(f[t], std=0.1)
                return
            for name, p in f.items():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(f["hada_w2_b"])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter {adapter_name!r} is merged; unmerge it before deleting")
        self._drop_params(adapter_name)
        self.clear_eval_cache()
        for d in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale):
            d.pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            self._active_adapter = [a for a in self._active_adapter if a != adapter_name]
            if not self._active_adapter and self.adapter_names:
                self._active_adapter = [self.adapter_names[0]]
        self._refresh_requires_grad()

    def _drop_params(self, adapter_name: str) -> None:
        for name in ADAPTER_PARAM_NAMES:
            d = getattr(self, name)
            if adapter_name in d:
                del d[adapter_name]

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        """Make these adapters active (their deltas add); only active adapters are trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = names
        self._trainable = trainable
        self.clear_eval_cache()
        self._refresh_requires_grad()

    def _refresh_requires_grad(self) -> None:
        trainable = getattr(self, "_trainable", True)
        for name in ADAPTER_PARAM_NAMES:
            for key, p in getattr(self, name).items():
                p.requires_grad_(trainable and key in self._active_adapter)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    # ---------------------------------------------------------------- math
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = s·(w1a@w1b)⊙(w2a@w2b) in the base weight's shape and layout, factor dtype."""
        return Fn.delta_weight(self.factors(adapter_name), self.geometry, self.scaling[adapter_name])

    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters a merge would apply (default: the active ones), each once; refuses unloaded factors."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in dict.fromkeys(names) if n in self.hada_w1_a and n not in self.merged_adapters]
        for name in names:
            self._check_loaded(name, self.factors(name), self.base_layer.weight)
        return names

    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """W + Σ ΔW on a copy, in W's dtype, exactly as :meth:`merge` would leave W.

        Raises:
            ValueError: naming the module and adapter, when the running sum is not finite.
        """
        w = self.base_layer.weight.detach()
        with torch.no_grad():
            for name in self._to_merge(adapter_names):
                w = w + self.get_delta_weight(name).to(w.dtype)  # cumulative, as merge() adds them
                if not torch.isfinite(w).all():
                    raise ValueError(f"{self.module_name}: merging adapter {name!r} gives non-finite weights; nothing merged")
        return w

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W += ΔW (computed in float32, cast once to W's dtype) for each adapter not yet merged.

        Args:
            safe_merge: Compute the merged weight on a copy and refuse (ValueError, weights
                untouched) if it is not finite.
            adapter_names: Adapters to merge; default the active ones.
        """
        names = self._to_merge(adapter_names)
        self.clear_eval_cache()
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe_merge:
                weight.data.copy_(self.merged_weight(names))
            else:
                for name in names:
                    weight.data.add_(self.get_delta_weight(name).to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW, newest first."""
        weight = self.base_layer.weight
        self.clear_eval_cache()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.sub_(self.get_delta_weight(name).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self._modules["base_layer"]
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        if self._disable_adapters or self.merged_adapters:
            return base(x, *args, **kwargs)
        # (adapter, rank-dropout mask) for each active adapter that module dropout keeps this call
        running: list[tuple[str, torch.Tensor | None]] = []
        loaded = self._modules["hada_w1_a"]._parameters
        for name in self._active_adapter:
            if name not in loaded:
                continue
            mask = None
            if self.training:
                if self.module_dropout[name] > 0 and torch.rand(1).item() <= self.module_dropout[name]:
                    continue
                if self.rank_dropout[name] > 0:
                    mask = Fn.rank_dropout_mask(
                        self.geometry.out_features, self.rank_dropout[name], self.rank_dropout_scale[name], x.device
                    )
            running.append((name, mask))
        if self._eval_cache and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for name, _ in running for t in self.factors(name)
        ):
            # An optimizer step may follow, and fused optimizers (torch AdamW(fused=True), the HF
            # Trainer default) update parameters without bumping their version counters. Done here,
            # before either path (fused node or general) runs.
            self._eval_cache.clear()
        if running and not args and not kwargs and torch.is_grad_enabled():
            fused = self._fused_forward(x, running)  # training a plain Linear/ConvNd: one autograd node
            if fused is not None:
                return fused
        result = base(x, *args, **kwargs)
        previous_dtype = result.dtype
        # The base output is ours to accumulate into, unless a forward hook on the base layer (or
        # a global one, nn.modules.module.register_module_forward_hook) may have kept a reference to it.
        owns_result = not base._forward_hooks and not _GLOBAL_FORWARD_HOOKS
        for name, mask in running:
            factors = self.factors(name)
            self._check_loaded(name, factors, result)
            cache = None if self.training else self._eval_cache_for(name, factors, result)
            result = Fn.loha_delta_forward(
                x, result, factors, self.geometry, self.scaling[name], mask, self.compute_path,
                cache=cache, inplace=owns_result,
            )
            owns_result = True
        return result if result.dtype == previous_dtype else result.to(previous_dtype)

    def _check_loaded(self, name: str, factors: HadaFactors, target: torch.Tensor) -> None:
        """Refuse to compute with factors still on the meta device (low_cpu_mem_usage, not loaded)."""
        if not target.is_meta and any(t is not None and t.is_meta for t in factors):
            raise RuntimeError(
                f"{self.module_name or type(self.base_layer).__name__}: adapter {name!r} has no values yet, its "
                "factors are on the meta device (created with low_cpu_mem_usage=True); load them first "
                "(load_adapter, from_pretrained, or load_state_dict(..., assign=True))"
            )

    def _fused_forward(self, x: torch.Tensor, running: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor | None:
        """Base layer + the running adapters as one autograd node, or None where that does not apply.

        The training path is chosen per call (:func:`~lohakit.core.functional.choose_training_path`,
        or forced by ``compute_path``):

        * ``"merged"``: a plain ``nn.Linear``/``nn.ConvNd`` runs once on ``W + ΣΔW``
          (:class:`~lohakit.core.functional.MergedWeightFused`; every running adapter, their ΔW summed);
        * ``"factored"`` with one adapter: a plain ``nn.Linear`` through
          :class:`~lohakit.core.functional.FactoredLinearFused` (saves the copy of the base output and
          the separate dL/dx sum), a plain one-group ``nn.ConvNd`` through
          :class:`~lohakit.core.functional.FactoredConvFused` when its dL/dx through ``W + ΔW``
          saves more than rebuilding ΔW costs.

        Used only where it computes exactly what the general path does (the ``*_applicable``
        checks); otherwise (None) the general path runs each adapter after the base layer.
        """
        all_factors = [self.factors(name) for name, _ in running]
        geom = self.geometry
        base = self.base_layer
        path = self.compute_path
        n_out, n_in = Fn.positions(x, None, geom)
        merged_ok = path in ("auto", "merged") and Fn.merged_weight_applicable(base, x, all_factors)
        if path == "auto":
            path = Fn.choose_training_path(geom, all_factors, n_out, n_in, merged_ok)
        if path == "merged" and merged_ok:
            scaled = []
            for (name, mask), factors in zip(running, all_factors):
                self._check_loaded(name, factors, x)
                scaled.append((factors, Fn.output_scale(self.scaling[name], mask, factors)))
            stage = Fn.Stage(geom.ndim, geom.stride, geom.padding, geom.dilation, geom.groups)
            return Fn.merged_weight_forward(x, base.weight, base.bias, stage, scaled, geom.kernel_size)
        if len(running) != 1 or path != "factored" or Fn._is_compiling():
            return None
        (name, mask), factors = running[0], all_factors[0]
        linear = geom.ndim == 0
        applicable = Fn.fused_linear_applicable if linear else Fn.fused_conv_applicable
        if not applicable(base, x, factors):
            return None
        self._check_loaded(name, factors, x)
        out_scale = Fn.output_scale(self.scaling[name], mask, factors)
        if linear:
            return Fn.FactoredLinearFused.apply(x, base.weight, base.bias, *factors[:4], out_scale)
        if not Fn.fused_conv_pays(geom, n_out, x.requires_grad):
            return None
        stage = Fn.Stage(geom.ndim, geom.stride, geom.padding, geom.dilation, 1)
        return Fn.FactoredConvFused.apply(x, base.weight, base.bias, stage, *factors[:4], out_scale)

    # ---------------------------------------------------------------- inference cache
    def _eval_cache_for(self, name: str, factors: HadaFactors, result: torch.Tensor) -> dict | None:
        """The cache dict for adapter ``name`` in eval mode, emptied if anything it depends on changed.

        The key holds, per factor, the Parameter's identity, storage pointer and autograd
        version counter (bumped by every in-place write: optimizer steps, ``copy_``,
        ``load_state_dict``), plus the scale, compute dtype, device and compute path. Writes
        through ``param.data`` bypass the version counter: call :meth:`clear_eval_cache` after
        those. Not used while ``torch.compile`` traces (the guards would recompile per step).
        """
        if Fn._is_compiling() or result.device.type == "meta":
            return None
        key = (
            self.scaling[name],
            result.dtype,
            result.device,
            self.compute_path,
            _OPTIMIZER_STEPS[0],
            tuple((id(t), t.data_ptr(), t._version) for t in factors if t is not None),
        )
        entry = self._eval_cache.get(name)
        if entry is None or entry[0] != key:
            entry = (key, {})
            self._eval_cache[name] = entry
        return entry[1]

    def clear_eval_cache(self) -> None:
        """Drop every cached inference weight (done automatically on merge, adapter changes, …)."""
        self._eval_cache.clear()

    def train(self, mode: bool = True) -> "LoHaLayer":
        """Switch mode; drops the inference cache (weights may have changed without a version bump)."""
        self.clear_eval_cache()
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class Linear(LoHaLayer):
    """LoHa on nn.Linear."""


class Conv1d(LoHaLayer):
    """LoHa on nn.Conv1d."""


class Conv2d(LoHaLayer):
    """LoHa on nn.Conv2d (flat or Tucker/effective form)."""


class Conv3d(LoHaLayer):
    """LoHa on nn.Conv3d."""


class HFConv1D(LoHaLayer):
    """LoHa on transformers' Conv1D (GPT-2 style, weight stored (in, out))."""
