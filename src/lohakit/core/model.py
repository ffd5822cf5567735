"""LoHaModel: injects LoHa layers into a model and manages the adapters' lifecycle.

The API mirrors PEFT's ``LoHaModel`` / ``PeftModel`` (add/set/delete adapters, merge, unload),
so code written against PEFT keeps working. Every operation validates first and changes the
model only when it can finish: a failed call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import warnings
from typing import Any, Iterator, Protocol

import torch
import torch.nn as nn

from .config import LoHaConfig, is_peft_loha_config
from .functional import COMPUTE_PATHS
from .layers import Conv1d, Conv2d, Conv3d, HFConv1D, Linear, LoHaLayer, _hf_conv1d_type
from .patterns import check_patterns
from .targets import DEFAULT_TARGET_MODULES, forget_compiled, matches_target, pattern_key, rank_and_alpha

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterStore", "LoHaModel", "ModulesToSaveWrapper", "get_peft_model", "inject_adapter_in_model", "register_adapter_store",
    "use_base_state_dict_keys",
]

class AdapterStore(Protocol):
    """Where :meth:`LoHaModel.save_pretrained` / ``from_pretrained`` / ``load_adapter`` go.

    The engine defines the three calls; a file format implements them and registers itself
    with :func:`register_adapter_store` (``lohakit.formats.peft`` does, for PEFT's directory
    format), so the dependency points from the formats to the engine, never back.
    """

    def save_pretrained(self, model: "LoHaModel", save_directory: str, **kwargs: Any) -> None: ...

    def from_pretrained(
        self, model: nn.Module, model_id: str, adapter_name: str, is_trainable: bool, low_cpu_mem_usage: bool,
        **kwargs: Any,
    ) -> "LoHaModel": ...

    def load_adapter(self, model: "LoHaModel", model_id: str, adapter_name: str, is_trainable: bool, **kwargs: Any) -> None: ...


_ADAPTER_STORE: AdapterStore | None = None


def register_adapter_store(store: AdapterStore) -> None:
    """Make ``store`` the format behind ``save_pretrained`` / ``from_pretrained`` / ``load_adapter``."""
    global _ADAPTER_STORE
    _ADAPTER_STORE = store


def adapter_store() -> AdapterStore:
    """The registered :class:`AdapterStore` (PEFT's directory format once ``lohakit`` is imported)."""
    if _ADAPTER_STORE is None:
        raise RuntimeError("no adapter file format is registered: import lohakit (it registers PEFT's directory format)")
    return _ADAPTER_STORE


_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or ".." in name or "/" in name or "\\" in name or not _ADAPTER_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid adapter name {name!r}: use letters, digits, '_' and '-' (no path separators or '..')"
        )
    if "." in name:
        raise ValueError(f"invalid adapter name {name!r}: '.' would break parameter paths")


def _warn_unused_patterns(config: LoHaConfig, keys: list[str]) -> None:
    """Warn (as PEFT does) about rank_pattern / alpha_pattern keys that match no adapted module."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        unused = [p for p in getattr(config, field_name) if not any(pattern_key([p], k) for k in keys)]
        if unused:
            warnings.warn(
                f"LoHaConfig.{field_name} key(s) {unused} matched no adapted module and were ignored",
                RuntimeWarning,
                stacklevel=4,
            )


class ModulesToSaveWrapper(nn.Module):
    """A module trained as a full copy per adapter (PEFT's ``modules_to_save``).

    Holds ``original_module`` (frozen) and ``modules_to_save[adapter]`` (trainable copies);
    calls go to the active adapter's copy, or to the original when adapters are disabled.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = []
        self._disabled = False
        self.add(adapter_name)
        self.original_module.requires_grad_(False)

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name in self._active)

    def set_adapter(self, names: list[str], trainable: bool = True) -> None:
        self._active = list(names)
        for key, m in self.modules_to_save.items():
            m.requires_grad_(trainable and key in self._active)

    def active_module(self) -> nn.Module:
        if self._disabled:
            return self.original_module
        for name in self._active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "_active" not in self.__dict__:
                raise
            # as PEFT: attributes (weight, out_features, ...) are those of the module that runs
            return getattr(self.active_module(), name)


class LoHaModel(nn.Module):
    """A model with LoHa adapters (PEFT-compatible API).

    Args:
        model: The model to adapt (modified in place: target layers are wrapped).
        config: The first adapter's configuration.
        adapter_name: Its name.
        low_cpu_mem_usage: Create the factors on the meta device (to be filled by a load).

    Example:
        >>> model = LoHaModel(base, LoHaConfig(r=8, target_modules=["q_proj", "v_proj"]))
        >>> loss = model(**batch).loss; loss.backward()
        >>> merged = model.merge_and_unload()
    """

    prefix: str = "hada_"
    tuner_layer_cls = LoHaLayer
    layers_mapping: dict[type[nn.Module], type[LoHaLayer]] = {
        nn.Linear: Linear,
        nn.Conv1d: Conv1d,
        nn.Conv2d: Conv2d,
        nn.Conv3d: Conv3d,
    }
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(
        self, model: nn.Module, config: LoHaConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
    ) -> None:
        if isinstance(model, LoHaModel):
            raise TypeError(
                "model is already a LoHaModel; add another adapter with model.add_adapter(name, config) "
                "instead of wrapping it again"
            )
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoHaConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.targeted_module_names: list[str] = []
        self.inject_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        _run_wrap_hooks()

    @classmethod
    def attach(cls, model: nn.Module) -> "LoHaModel":
        """A LoHaModel around a model adapted in place by :func:`inject_adapter_in_model`.

        Nothing is injected or copied: the wrapper sees the adapters already inside ``model``
        (for ``save_pretrained``, ``set_adapter``, ``merge_adapter`` ...); adapters added through
        it are recorded on ``model`` too.

        Raises:
            ValueError: ``model`` was not adapted by :func:`inject_adapter_in_model`.
        """
        configs = model.__dict__.get(_INJECTED_CONFIGS)
        if not configs:
            raise ValueError(
                f"{type(model).__name__} holds no adapter injected by lohakit.inject_adapter_in_model; "
                "use LoHaModel(model, config) to add one"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model = model
        self.peft_config = configs  # shared: adapters added through the wrapper are recorded on the model
        self.active_adapter = next(iter(configs))
        layers = [n for n, _ in self.loha_layers()]
        self.targeted_module_names = layers
        active = next((layer.active_adapters for _, layer in self.loha_layers()), None)
        if active:
            self.active_adapter = active[0] if len(active) == 1 else list(active)
        _run_wrap_hooks()
        return self

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        model = self._modules.get("model")
        try:
            return getattr(model, name)
        except AttributeError:
            raise AttributeError(
                f"'LoHaModel' object (wrapping {type(model).__name__}) has no attribute {name!r}"
            ) from None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, with its LoHa layers in place (PEFT's ``get_base_model``)."""
        return self.model

    @property
    def base_model(self) -> "LoHaModel":
        """What PEFT's ``PeftModel.base_model`` is: the object holding the adapters, whose
        ``.model`` is the wrapped model (``model.base_model.model.model.layers[0]`` works as in
        PEFT, and parameter paths read ``base_model.model.<module path>`` as in PEFT's files).
        lohakit has one object in both of PEFT's roles, so this is the LoHaModel itself."""
        return self

    @property
    def forward_signature(self) -> inspect.Signature:
        """The wrapped model's ``forward`` signature (``forward`` passes every argument on).

        Tools that filter inputs by the model's signature (transformers' Trainer with
        ``remove_unused_columns``) should look here; :class:`lohakit.integrations.transformers.LoHaTrainer` does.
        """
        return inspect.signature(self.model.forward)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def loha_layers(self) -> Iterator[tuple[str, LoHaLayer]]:
        """(path, layer) for every LoHa layer, paths relative to the wrapped model."""
        for name, m in self.model.named_modules():
            if isinstance(m, LoHaLayer):
                yield name, m

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper):
                yield name, m

    @classmethod
    def _layer_class_for(cls, module: nn.Module) -> type[LoHaLayer] | None:
        mapping = dict(cls.layers_mapping)
        hf = _hf_conv1d_type()
        if hf is not None:
            mapping[hf] = HFConv1D
        t = mapping.get(type(module))
        if t is None:
            t = next((v for k, v in mapping.items() if isinstance(module, k)), None)
        return t

    # ------------------------------------------------------------------ targets
    def _resolve_config(self, config: LoHaConfig) -> LoHaConfig:
        config = copy.deepcopy(config)
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    "LoHaConfig.target_modules is None and there is no default for model_type "
                    f"{model_type!r}; give target_modules (known defaults: {sorted(self.target_module_mapping)})"
                )
            default = self.target_module_mapping[model_type]
            config.target_modules = default if isinstance(default, str) else list(default)  # str: a regex
        return config

    def _output_layer_names(self) -> set[str]:
        names = {"lm_head"}
        get_out = getattr(self.model, "get_output_embeddings", None)
        if callable(get_out):
            with contextlib.suppress(Exception):
                out = get_out()
                for n, m in self.model.named_modules():
                    if out is not None and m is out:
                        names.add(n)
        return names

    def _find_targets(self, config: LoHaConfig) -> list[tuple[str, nn.Module]]:
        """Module paths to adapt, after every name and type rule; raises if nothing matches."""
        skip_prefixes: list[str] = []
        targets: list[tuple[str, nn.Module]] = []
        all_linear = config.target_modules == "all-linear"
        out_names = self._output_layer_names() if all_linear else set()
        if all_linear and config.layers_to_transform not in (None, []):
            warnings.warn(
                "LoHaConfig.layers_to_transform is ignored with target_modules='all-linear' (as in PEFT, which "
                "expands 'all-linear' to full module paths); list the modules or use a regex to select layers",
                UserWarning,
                stacklevel=4,
            )
        linear_types: tuple[type, ...] = (nn.Linear,) + ((_hf_conv1d_type(),) if _hf_conv1d_type() else ())
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj, so an
        # adapter there would act only once merged (PEFT's LoHa wraps it anyway): skip, with a warning.
        mha_out = {n + ".out_proj" if n else "out_proj" for n, m in self.model.named_modules()
                   if isinstance(m, nn.MultiheadAttention)}
        skipped_mha: list[str] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(p) for p in skip_prefixes):
                continue
            if isinstance(module, (LoHaLayer, ModulesToSaveWrapper)):
                skip_prefixes.append(name + ".")
            base = module.base_layer if isinstance(module, LoHaLayer) else module
            linear = isinstance(base, linear_types) and name not in out_names and name.split(".")[-1] not in out_names
            hit = matches_target(config, name, linear_candidate=linear)
            if name in mha_out:
                if hit:
                    skipped_mha.append(name)
                continue
            if hit:
                targets.append((name, module))
        counts: dict[int, int] = {}
        for _, m in self.model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        aliased = [n for n, m in targets if counts.get(id(m), 1) > 1]
        if aliased:
            warnings.warn(
                f"modules {aliased[:5]} are registered under more than one name; only the first name is adapted "
                "(calls through the other names skip the adapter until it is merged)",
                UserWarning,
                stacklevel=4,
            )
        if skipped_mha:
            warnings.warn(
                f"not adapting {skipped_mha[:5]}{' and more' if len(skipped_mha) > 5 else ''}: nn.MultiheadAttention "
                "uses out_proj.weight directly, so a LoHa adapter there would have no effect unless merged",
                UserWarning,
                stacklevel=4,
            )
        if not targets:
            sample = [n for n, _ in self.model.named_modules() if n][:20]
            raise ValueError(
                f"target_modules {config.target_modules!r} matched no module of the model "
                f"(exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}). "
                f"Some module names: {sample}"
            )
        bad = [
            (n, type(m).__name__)
            for n, m in targets
            if not isinstance(m, LoHaLayer) and self._layer_class_for(m) is None
        ]
        if bad:
            supported = sorted(t.__name__ for t in self.layers_mapping) + (["Conv1D"] if _hf_conv1d_type() else [])
            n, t = bad[0]
            raise TypeError(
                f"LoHa cannot adapt module {n!r} of type {t} (matched by target_modules); "
                f"supported types: {supported}" + (f"; {len(bad) - 1} more unsupported matches" if len(bad) > 1 else "")
            )
        return targets

    # ------------------------------------------------------------------ injection
    def _create_and_replace(
        self,
        config: LoHaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        device: torch.device | str | None = None,
    ) -> None:
        """Add adapter ``adapter_name`` at ``current_key``: update an existing LoHa layer or wrap the module."""
        r, alpha = rank_and_alpha(config, current_key)
        kwargs = dict(
            r=r,
            alpha=alpha,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
            init_weights=config.init_weights,
            use_effective_conv2d=config.use_effective_conv2d,
            rank_dropout_scale=config.rank_dropout_scale,
            device=device,
        )
        if isinstance(target, LoHaLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        cls = self._layer_class_for(target)
        if cls is None:
            raise TypeError(f"LoHa cannot adapt module {current_key!r} of type {type(target).__name__}")
        new = cls(target, module_name=current_key)
        new.set_adapter(self.active_adapters, trainable=not config.inference_mode)
        new.update_layer(adapter_name, **kwargs)
        setattr(parent, target_name, new)

    def _parent(self, key: str) -> tuple[nn.Module, str]:
        if "." in key:
            parent_name, child = key.rsplit(".", 1)
            return self.model.get_submodule(parent_name), child
        return self.model, key

    def inject_adapter(self, adapter_name: str, config: LoHaConfig, low_cpu_mem_usage: bool = False) -> None:
        """Validate, then add adapter ``adapter_name`` to every target (atomic: all or nothing)."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        config = _as_loha_config(config)
        config.validate()
        forget_compiled(config)  # fields edited in place since the last use are read afresh
        check_patterns(config, "LoHaConfig", [n for n, _ in self.model.named_modules()])  # bounded on the real names
        config = self._resolve_config(config)
        targets = self._find_targets(config)
        self._check_modules_to_save(config)
        self._check_name_free(adapter_name, targets)
        _warn_unused_patterns(config, [k for k, _ in targets])
        grad_flags = {id(p): p.requires_grad for p in self.model.parameters()}
        if not self.peft_config:  # the base model is frozen once, when the first adapter arrives
            for p in self.model.parameters():
                p.requires_grad_(False)
        device = "meta" if low_cpu_mem_usage else None
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[LoHaLayer] = []
        try:
            for key, module in targets:
                parent, child = self._parent(key)
                if isinstance(module, LoHaLayer):
                    updated.append(module)
                else:
                    replaced.append((parent, child, module))
                self._create_and_replace(config, adapter_name, module, child, parent, key, device=device)
            self._add_modules_to_save(config, adapter_name)
        except Exception:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, child, module in replaced:
                setattr(parent, child, module)
            for p in self.model.parameters():
                if id(p) in grad_flags:
                    p.requires_grad_(grad_flags[id(p)])
            raise
        self.peft_config[adapter_name] = config
        self.targeted_module_names = sorted({*self.targeted_module_names, *(k for k, _ in targets)})
        self._apply_active()

    def _check_modules_to_save(self, config: LoHaConfig) -> None:
        modules = dict(self.model.named_modules())
        wrapped = [p for p, _ in self._wrappers()]
        for name in config.modules_to_save or []:
            hits = [k for k in modules if k == name or k.endswith("." + name)]
            if not hits:
                raise ValueError(f"modules_to_save entry {name!r} matched no module of the model")
            for key in hits:
                if any(key.startswith(p + ".") for p in wrapped) or isinstance(modules[key], ModulesToSaveWrapper):
                    continue
                inner = next((n for n, m in modules[key].named_modules() if isinstance(m, LoHaLayer)), None)
                if inner is not None:
                    where = key + ("." + inner if inner else "")
                    raise ValueError(
                        f"modules_to_save entry {name!r}: module {key!r} holds a LoHa layer ({where!r}) of another "
                        "adapter; a module cannot be both adapted and trained as a full copy"
                    )

    def _check_name_free(self, adapter_name: str, targets: list[tuple[str, nn.Module]]) -> None:
        """The name must be new on every layer it would touch (layers may come from another LoHaModel)."""
        for key, module in targets:
            if isinstance(module, LoHaLayer) and adapter_name in module.adapter_names:
                raise ValueError(
                    f"module {key!r} already holds an adapter named {adapter_name!r} (its LoHa layer was "
                    "created by another LoHaModel); choose another adapter name"
                )
        for key, w in self._wrappers():
            if adapter_name in w.modules_to_save:
                raise ValueError(f"modules_to_save wrapper {key!r} already holds a copy named {adapter_name!r}")

    def _add_modules_to_save(self, config: LoHaConfig, adapter_name: str) -> None:
        for name in config.modules_to_save or []:
            found = False
            for key, module in list(self.model.named_modules()):
                if not (key == name or key.endswith("." + name)):
                    continue
                if any(key.startswith(p + ".") for p, _ in self._wrappers()):
                    continue
                found = True
                if isinstance(module, ModulesToSaveWrapper):
                    module.add(adapter_name)
                else:
                    parent, child = self._parent(key)
                    setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
            if not found:
                raise ValueError(f"modules_to_save entry {name!r} matched no module of the model")

    def _apply_active(self) -> None:
        names = self.active_adapters
        for _, layer in self.loha_layers():
            trainable = not any(self.peft_config[n].inference_mode for n in names if n in self.peft_config)
            layer.set_adapter(names, trainable=trainable)
        for _, w in self._wrappers():
            trainable = not any(self.peft_config[n].inference_mode for n in names if n in self.peft_config)
            w.set_adapter(names, trainable=trainable)

    # ------------------------------------------------------------------ adapter lifecycle
    def add_adapter(self, adapter_name: str, config: LoHaConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add another adapter (not activated; use :meth:`set_adapter`)."""
        self.inject_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or several (their deltas add)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(dict.fromkeys(adapter_name))  # no repeats
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"unknown adapter(s) {missing or names}; available: {sorted(self.peft_config)}")
        for key, w in self._wrappers():
            copies = [n for n in names if n in w.modules_to_save]
            if len(copies) > 1:
                raise ValueError(
                    f"adapters {copies} each train their own copy of {key!r} (modules_to_save); only one of "
                    "them can be active at a time"
                )
        if any(layer.merged for _, layer in self.loha_layers()):
            logger.warning("set_adapter while adapters are merged: unmerging first")
            self.unmerge_adapter()
        self.active_adapter = names[0] if len(names) == 1 else names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; a merged adapter must be unmerged first."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        merged_in = [n for n, layer in self.loha_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged_in[:5]}; unmerge_adapter() first")
        for _, layer in self.loha_layers():
            layer.delete_adapter(adapter_name)
        for _, w in self._wrappers():
            if adapter_name in w.modules_to_save:
                del w.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        self._apply_active()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model (adapters and trained module copies off)."""
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(True)

    def _set_enabled(self, enabled: bool) -> None:
        for _, layer in self.loha_layers():
            layer.enable_adapters(enabled)
        for _, w in self._wrappers():
            w._disabled = not enabled

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        self._set_enabled(False)

    # ------------------------------------------------------------------ merging
    def _check_names(self, adapter_names: list[str] | None) -> list[str] | None:
        if adapter_names is None:
            return None
        missing = [n for n in adapter_names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; available: {sorted(self.peft_config)}")
        return list(dict.fromkeys(adapter_names))  # a repeated name must not merge twice

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights.

        With ``safe_merge`` every merged weight is checked for finiteness first; on failure
        nothing is merged anywhere and a ValueError names the module.
        """
        names = self._check_names(adapter_names)
        layers = [layer for _, layer in self.loha_layers()]
        for layer in layers:  # refuse unloaded (meta) factors before touching any weight
            layer._to_merge(names)
        if safe_merge:
            # Check every layer before changing any. The merged copies are dropped and merge()
            # recomputes them: holding them all would double the model's memory.
            for layer in layers:
                layer.merged_weight(names)
        for layer in layers:
            layer.merge(safe_merge=False, adapter_names=names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.loha_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        for key, layer in list(self.loha_layers()):
            parent, child = self._parent(key)
            setattr(parent, child, layer.base_layer)
        for key, w in list(self._wrappers()):
            parent, child = self._parent(key)
            setattr(parent, child, w.active_module() if merge else w.original_module)
        self.peft_config = {}
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge adapters into the weights and return the plain base model."""
        return self._unload(True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model (weights as before)."""
        return self._unload(False)

    def get_delta_weight(self, module_name: str, adapter_name: str | None = None) -> torch.Tensor:
        """ΔW of one adapted module (default: the first active adapter)."""
        layer = self.model.get_submodule(module_name)
        if not isinstance(layer, LoHaLayer):
            raise ValueError(f"module {module_name!r} has no LoHa adapter")
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in layer.hada_w1_a:
            raise ValueError(f"module {module_name!r} has no adapter {adapter_name!r}")
        return layer.get_delta_weight(adapter_name)

    def set_compute_path(self, path: str) -> None:
        """Force ``"factored"``, ``"merged"`` or ``"materialised"`` on every layer, or ``"auto"`` (cost model)."""
        if path not in COMPUTE_PATHS:
            raise ValueError(f"compute path must be one of {', '.join(map(repr, COMPUTE_PATHS))}, got {path!r}")
        for _, layer in self.loha_layers():
            layer.compute_path = path  # type: ignore[assignment]

    # ------------------------------------------------------------------ introspection
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = total = 0
        seen: set[int] = set()
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    def adapter_state_dict(self, adapter_name: str | None = None, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed ``<module path>.hada_w1_a`` (and modules_to_save copies).

        With ``keep_vars`` the modules_to_save entries are their live parameters (as
        ``nn.Module.state_dict(keep_vars=True)``), not detached tensors; the LoHa factors are
        always the live parameters.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        out: dict[str, torch.Tensor] = {}
        for key, layer in self.loha_layers():
            for pname in LoHaLayer.adapter_layer_names:
                d = getattr(layer, pname)
                if adapter_name in d:
                    out[f"{key}.{pname}"] = d[adapter_name]
        for key, w in self._wrappers():
            if adapter_name in w.modules_to_save:
                for n, t in w.modules_to_save[adapter_name].state_dict(keep_vars=keep_vars).items():
                    out[f"{key}.{n}"] = t
        return out

    # ------------------------------------------------------------------ adapter files
    # The engine does not know file formats: these delegate to the registered AdapterStore
    # (PEFT's directory format, registered by lohakit.formats.peft when lohakit is imported).
    def save_pretrained(
        self, save_directory: str, selected_adapters: list[str] | None = None, save_dtype: Any = None, **kwargs: Any
    ) -> None:
        """Write adapters as PEFT does (see :func:`lohakit.formats.peft.save_pretrained`)."""
        adapter_store().save_pretrained(
            self, save_directory, selected_adapters=selected_adapters, save_dtype=save_dtype, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
        low_cpu_mem_usage: bool = False, **kwargs: Any,
    ) -> "LoHaModel":
        """Load a PEFT-format adapter onto ``model`` (see :func:`lohakit.formats.peft.from_pretrained`)."""
        return adapter_store().from_pretrained(model, model_id, adapter_name, is_trainable, low_cpu_mem_usage, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Add a PEFT-format adapter (see :func:`lohakit.formats.peft.load_adapter`)."""
        adapter_store().load_adapter(self, model_id, adapter_name, is_trainable, **kwargs)
    # ------------------------------------------------------------------ end of adapter files


def _as_loha_config(config: Any) -> LoHaConfig:
    """``config`` itself, or a ``peft.LoHaConfig`` converted (see :meth:`LoHaConfig.from_peft`)."""
    if isinstance(config, LoHaConfig):
        return config
    if is_peft_loha_config(config):
        return LoHaConfig.from_peft(config)
    raise TypeError(
        f"config must be a lohakit.LoHaConfig or a peft.LoHaConfig, got {type(config).__module__}.{type(config).__name__}"
    )


def get_peft_model(
    model: nn.Module, config: LoHaConfig | Any, adapter_name: str = "default", low_cpu_mem_usage: bool = False, **kwargs: Any
) -> LoHaModel:
    """Wrap ``model`` with a LoHa adapter (PEFT's entry point).

    Args:
        model: The model to adapt (its target layers are wrapped in place).
        config: A :class:`LoHaConfig`, or PEFT's ``peft.LoHaConfig`` (converted; fields with no
            lohakit counterpart and a non-default value are named in a warning).
        adapter_name: Name of the first adapter.
        low_cpu_mem_usage: Create the factors on the meta device (to be filled by a load).
        **kwargs: PEFT's other keywords (``mixed``, ``autocast_adapter_dtype``, ``revision``):
            accepted for compatibility; ``mixed=True`` is refused.
    """
    if kwargs.get("mixed"):
        raise ValueError("get_peft_model(mixed=True) (PEFT's mixed adapter types) is not supported by lohakit")
    unknown = sorted(set(kwargs) - {"mixed", "autocast_adapter_dtype", "revision"})
    if unknown:
        raise TypeError(f"get_peft_model() got unexpected keyword argument(s) {unknown}")
    return LoHaModel(model, _as_loha_config(config), adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)


# ---------------------------------------------------------------------- wrap hooks
#: Called (no arguments) whenever a LoHaModel wraps a model; integrations register theirs
#: (:mod:`lohakit.integrations.diffusers` guards pipeline saves), so the engine knows no library.
_WRAP_HOOKS: list[Any] = []


def register_wrap_hook(hook: Any) -> None:
    """Run ``hook()`` each time a :class:`LoHaModel` is created or attached (idempotent per hook)."""
    if hook not in _WRAP_HOOKS:
        _WRAP_HOOKS.append(hook)


def _run_wrap_hooks() -> None:
    for hook in _WRAP_HOOKS:
        hook()


# ---------------------------------------------------------------------- in-place injection
_ADAPTER_PART = re.compile(r"(^|\.)(hada_[a-z0-9_]+|modules_to_save)\.")
_INJECTED_CONFIGS = "_lohakit_configs"


def _layer_paths(model: nn.Module) -> tuple[list[str], list[str]]:
    layers = [n for n, m in model.named_modules() if isinstance(m, LoHaLayer)]
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return layers, wrappers


def _base_keys_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict() of an injected model: the base model's own keys (and only those)."""
    items = list(state_dict.items())
    state_dict.clear()  # rebuilt in the same order, under the base model's names
    for key, value in items:
        rel = key[len(prefix):] if key.startswith(prefix) else None
        if rel is None:
            state_dict[key] = value
            continue
        if _ADAPTER_PART.search(rel):
            continue
        new = rel.replace(".base_layer.", ".").replace(".original_module.", ".")
        new = re.sub(r"^(base_layer|original_module)\.", "", new)
        state_dict[prefix + new] = value


def _base_keys_load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict() of an injected model accepts the base model's keys (``to_q.weight``)."""
    layers, wrappers = _layer_paths(module)
    renames = [(p, "base_layer") for p in layers] + [(p, "original_module") for p in wrappers]
    for path, inner in renames:
        head = prefix + (path + "." if path else "")
        for key in [k for k in state_dict if k.startswith(head)]:
            rest = key[len(head):]
            if rest.split(".", 1)[0] in (inner, "modules_to_save") or _ADAPTER_PART.search(rest) or rest.startswith("hada_"):
                continue
            state_dict[head + inner + "." + rest] = state_dict.pop(key)


def _base_keys_load_post_hook(module: nn.Module, incompatible: Any) -> None:
    """Adapter tensors are not part of an injected model's checkpoint: not reported missing."""
    keep = [k for k in incompatible.missing_keys if not _ADAPTER_PART.search(k)]
    incompatible.missing_keys[:] = keep


def inject_adapter_in_model(
    config: LoHaConfig | Any, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Add a LoHa adapter to ``model`` in place and return ``model`` itself, class unchanged.

    PEFT's ``inject_adapter_in_model`` counterpart (same argument order): a
    ``UNet2DConditionModel`` stays a ``UNet2DConditionModel`` (a ``PreTrainedModel`` stays one)
    with LoHa layers inside, so diffusers pipelines and transformers treat it as the model
    they know. The base model is frozen; the adapter's factors are trainable.

    Its ``state_dict()`` reports the base model under the base model's own keys (no
    ``base_layer`` level, no adapter tensors), and ``load_state_dict`` accepts them: so
    ``pipe.save_pretrained`` / ``model.save_pretrained`` write the base weights as a loadable
    model (the merged weights while an adapter is merged). Save the adapter itself with
    :func:`lohakit.diffusers.save_loha_weights` (kohya file) or, in PEFT's format, with
    ``LoHaModel.attach(model).save_pretrained(dir)``.

    Args:
        config: A :class:`LoHaConfig` or a ``peft.LoHaConfig``.
        model: The model to adapt.
        adapter_name: Name of the adapter; call again with another name to add one more.
        low_cpu_mem_usage: Create the factors on the meta device (to be filled by a load).

    Returns:
        ``model``.
    """
    configs: dict[str, LoHaConfig] = dict(model.__dict__.get(_INJECTED_CONFIGS, {}))
    if adapter_name in configs:
        raise ValueError(f"model already holds an adapter named {adapter_name!r}; choose another name")
    loha = LoHaModel.attach(model) if configs else None
    if loha is None:
        loha = LoHaModel(model, _as_loha_config(config), adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    else:
        loha.add_adapter(adapter_name, _as_loha_config(config), low_cpu_mem_usage=low_cpu_mem_usage)
    configs[adapter_name] = loha.peft_config[adapter_name]
    model.__dict__[_INJECTED_CONFIGS] = configs
    use_base_state_dict_keys(model)
    return model


def use_base_state_dict_keys(model: nn.Module) -> nn.Module:
    """Make ``model.state_dict()`` / ``load_state_dict`` speak the base model's keys (idempotent).

    For models that carry LoHa layers in place (:func:`inject_adapter_in_model` calls it): the
    state dict leaves out the adapter tensors and the ``base_layer`` / ``original_module``
    levels, so the model class's own ``save_pretrained`` writes a checkpoint that the unadapted
    class loads. Returns ``model``.
    """
    if not model.__dict__.get("_lohakit_hooks"):
        model.register_state_dict_post_hook(_base_keys_state_dict_hook)
        model.register_load_state_dict_pre_hook(_base_keys_load_pre_hook)
        model.register_load_state_dict_post_hook(_base_keys_load_post_hook)
        model.__dict__["_lohakit_hooks"] = True
    return model
