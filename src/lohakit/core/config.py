"""LoHaConfig: PEFT's LoHa configuration, field for field, with validation and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .patterns import check_patterns

logger = logging.getLogger(__name__)

__all__ = ["LoHaConfig", "is_peft_loha_config"]

ADAPTER_CONFIG_NAME = "adapter_config.json"


def is_peft_loha_config(config: Any) -> bool:
    """True for a configuration object of the ``peft`` package (any type; checked by duck typing).

    lohakit never imports peft for this: a PEFT config is anything with ``to_dict()`` and a
    ``peft_type`` attribute that is not a lohakit :class:`LoHaConfig`.
    """
    return not isinstance(config, LoHaConfig) and hasattr(config, "peft_type") and callable(getattr(config, "to_dict", None))

#: Keys PEFT writes into adapter_config.json that lohakit does not keep: dropped quietly.
_PEFT_BOOKKEEPING = {"peft_version", "auto_mapping"}
#: Keys other PEFT versions / PeftConfig subclasses may write: ignored with a warning.
_PEFT_ONLY_KEYS = {
    "target_parameters", "trainable_token_indices", "modules_to_tie", "layer_replication",
    "megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying", "lora_alpha",
}


_FLOAT32_MAX = 3.4028234663852886e38


def _scale_numerator(v: Any) -> bool:
    """A usable alpha: a positive number whose scale alpha / r is finite in float32 (the factors' dtype)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < _FLOAT32_MAX


@dataclass
class LoHaConfig:
    """Configuration of a LoHa adapter (same field names and defaults as ``peft.LoHaConfig``).

    Args:
        r: Rank of each Hadamard branch.
        alpha: Scaling numerator; the adapter is scaled by ``alpha / r``.
        rank_dropout: Probability of dropping an output row of ΔW during training.
        module_dropout: Probability of skipping the adapter for a whole call during training.
        use_effective_conv2d: Tucker ("effective conv", FedPara Prop. 3) form for k>1 convs.
        target_modules: List of names (exact or dotted-suffix match), a regex (full match), or
            ``"all-linear"``. ``None``: the default for the transformers ``model_type``.
        exclude_modules: Names or regex of modules never to adapt.
        init_weights: ``True`` (ΔW = 0, PEFT's init), ``False`` (all factors random) or
            ``"lycoris"`` (LyCORIS' init: w2_a = 0, w1_a ~ N(0, 0.1), w1_b, w2_b ~ N(0, 1)).
        layers_to_transform: Layer indices to adapt (int or list).
        layers_pattern: Name(s) of the layer list (e.g. ``"layers"``, ``"h"``).
        rank_pattern: ``{regex: rank}`` overrides, matched against the module path.
        alpha_pattern: ``{regex: alpha}`` overrides.
        modules_to_save: Modules (besides adapters) to train and save as full copies.
        rank_dropout_scale: Rescale the rank-dropout mask by its mean (PEFT: always).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    init_weights: Union[bool, Literal["lycoris"]] = True
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Union[list[str], None] = None
    rank_dropout_scale: bool = True
    # bookkeeping PEFT writes
    peft_type: str = "LOHA"
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    inference_mode: bool = False
    revision: Union[str, None] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.layers_pattern, tuple):
            self.layers_pattern = list(self.layers_pattern)
        # PEFT's own dicts hold enum members (PeftType.LOHA, TaskType.CAUSAL_LM): keep their values
        self.peft_type = getattr(self.peft_type, "value", self.peft_type)
        self.task_type = getattr(self.task_type, "value", self.task_type)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when the config is inconsistent."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoHaConfig.r must be a positive int, got {self.r!r}")
        if not _scale_numerator(self.alpha):
            raise ValueError(f"LoHaConfig.alpha must be a positive finite number below {_FLOAT32_MAX:.3g} (float32's range), got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"LoHaConfig.{name} must be a probability in [0, 1), got {v!r}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoHaConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if self.peft_type != "LOHA":
            raise ValueError(f"LoHaConfig.peft_type must be 'LOHA', got {self.peft_type!r}")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(s, str) for s in v)
            ):
                raise ValueError(f"LoHaConfig.{name} must be a string, a list of strings or None, got {v!r}")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(s, str) for s in self.modules_to_save)
        ):
            raise ValueError(f"LoHaConfig.modules_to_save must be a list of strings or None, got {self.modules_to_save!r}")
        if self.layers_to_transform is not None:
            lt = self.layers_to_transform
            ok = (isinstance(lt, int) and not isinstance(lt, bool)) or (
                isinstance(lt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in lt)
            )
            if not ok:
                raise ValueError(f"LoHaConfig.layers_to_transform must be an int or a list of ints, got {lt!r}")
        if self.layers_pattern is not None and self.layers_pattern != [] and self.layers_to_transform is None:
            raise ValueError("LoHaConfig.layers_pattern is only used together with layers_to_transform; set both")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            if self.layers_to_transform is not None:
                raise ValueError(
                    "LoHaConfig.layers_to_transform cannot be combined with a regex target_modules; "
                    "put the layer indices into the regex instead"
                )
        for key, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoHaConfig.rank_pattern[{key!r}] must be a positive int, got {v!r}")
        for key, v in self.alpha_pattern.items():
            if not _scale_numerator(v):
                raise ValueError(f"LoHaConfig.alpha_pattern[{key!r}] must be a positive finite number below {_FLOAT32_MAX:.3g}, got {v!r}")
        if not isinstance(self.rank_dropout_scale, bool):
            raise ValueError(f"LoHaConfig.rank_dropout_scale must be a bool, got {self.rank_dropout_scale!r}")
        # every regex compiles in the form the target rules build and matches in bounded time
        check_patterns(self, "LoHaConfig")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict in the layout of PEFT's adapter_config.json."""
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False, source: str | None = None) -> "LoHaConfig":
        """Build from a dict such as PEFT's adapter_config.json.

        Keys that PEFT writes but lohakit does not use are ignored (with a warning when they
        carry a value); any other unknown key raises a ``ValueError`` listing the valid keys.
        A ``peft_type`` other than LOHA always raises.

        Args:
            data: The mapping.
            strict: Also raise on PEFT-only keys that carry a value, instead of warning.
            source: A file name to mention in messages.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise ValueError(f"LoHa config{where} must be a JSON object, got {type(data).__name__}")
        pt = data.get("peft_type", "LOHA")
        pt = getattr(pt, "value", pt)  # PeftType.LOHA from a PEFT config's to_dict()
        if pt is not None and str(pt).upper() != "LOHA":
            raise ValueError(f"LoHa config{where}: peft_type is {pt!r}, expected 'LOHA'")
        known = set(cls.field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["peft_type"] = "LOHA"
        peft_only = sorted(k for k in data if k in _PEFT_ONLY_KEYS and data[k] not in (None, [], {}, ""))
        unknown = sorted(k for k in data if k not in known and k not in _PEFT_BOOKKEEPING | _PEFT_ONLY_KEYS)
        if unknown:
            raise ValueError(f"LoHa config{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        if peft_only:
            if strict:
                raise ValueError(f"LoHa config{where}: PEFT-only key(s) {peft_only} are not supported by lohakit")
            logger.warning("LoHa config%s: PEFT-only key(s) %s are not supported by lohakit and were ignored", where, peft_only)
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write as JSON (``extra`` keys such as peft_version are merged in)."""
        d = self.to_dict()
        if extra:
            d.update(extra)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(d, fh, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, strict: bool = False) -> "LoHaConfig":
        """Read an adapter_config.json (PEFT's or ours)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        return cls.from_dict(data, strict=strict, source=str(path))

    # ------------------------------------------------------------------ PEFT interoperability
    @classmethod
    def from_peft(cls, peft_config: Any) -> "LoHaConfig":
        """Convert a ``peft.LoHaConfig`` (or its ``to_dict()``) into a lohakit config.

        Every field PEFT's LoHa has is carried over unchanged. Fields lohakit has no counterpart
        for are dropped with one ``UserWarning`` naming them, but only when they differ from
        PEFT's default (an untouched default changes nothing).

        Raises:
            ValueError: ``peft_type`` is not LOHA (a LoRA config cannot become a LoHa one).
        """
        data = dict(peft_config) if isinstance(peft_config, dict) else peft_config.to_dict()
        pt = data.get("peft_type", "LOHA")
        pt = getattr(pt, "value", pt)
        if pt is not None and str(pt).upper() != "LOHA":
            raise ValueError(f"cannot convert a PEFT {pt} config into a LoHaConfig (peft_type must be LOHA)")
        defaults: dict[str, Any] = {}
        if not isinstance(peft_config, dict):
            try:
                defaults = type(peft_config)().to_dict()
            except Exception:  # a config class that needs arguments: compare with "empty" instead
                defaults = {}
        known = set(cls.field_names())

        def _set(v: Any) -> bool:
            return v not in (None, [], {}, "", False)

        dropped = sorted(
            k for k, v in data.items()
            if k not in known and k not in _PEFT_BOOKKEEPING
            and (v != defaults[k] if k in defaults else _set(v))
        )
        if dropped:
            warnings.warn(
                f"PEFT LoHaConfig field(s) {dropped} have no lohakit counterpart and were ignored",
                UserWarning,
                stacklevel=3,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["peft_type"] = "LOHA"
        if isinstance(kwargs.get("target_modules"), (set, frozenset)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        if isinstance(kwargs.get("exclude_modules"), (set, frozenset)):
            kwargs["exclude_modules"] = sorted(kwargs["exclude_modules"])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        *,
        strict: bool = False,
        **hub_kwargs: Any,
    ) -> "LoHaConfig":
        """Read ``adapter_config.json`` from an adapter directory or a Hugging Face Hub repo id.

        Args:
            pretrained_model_name_or_path: A local directory (or the JSON file itself), or a Hub
                repo id such as ``"user/my-loha"`` (downloaded with ``huggingface_hub``).
            subfolder: A folder inside it (a non-default adapter's name).
            revision: Hub revision.
            strict: Raise on PEFT-only keys that carry a value instead of warning.
            **hub_kwargs: Passed to ``huggingface_hub.hf_hub_download`` (token, cache_dir, ...).

        Raises:
            FileNotFoundError: Neither a directory with ``adapter_config.json`` nor a Hub repo
                that has one.
            ValueError: The file is not a LoHa config (see :meth:`from_dict`).
        """
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        if path.is_file():
            return cls.from_json_file(path, strict=strict)
        if path.is_dir():
            candidate = path / ADAPTER_CONFIG_NAME
            if not candidate.is_file():
                raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG_NAME} in this directory")
            return cls.from_json_file(candidate, strict=strict)
        name = str(pretrained_model_name_or_path)
        if os.path.isabs(name) or name.startswith(".") or name.count("/") != 1:
            raise FileNotFoundError(f"{name}: no such adapter directory (and not a Hub repo id 'user/name')")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            raise FileNotFoundError(f"{name}: not a local directory, and huggingface_hub is not installed") from None
        try:
            local = hf_hub_download(name, ADAPTER_CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        except Exception as e:  # hub errors come in many types; report one clear line
            raise FileNotFoundError(f"{name}: no local directory, and the Hub has no {ADAPTER_CONFIG_NAME} there ({type(e).__name__})") from e
        return cls.from_json_file(local, strict=strict)
