"""Issue 14 in the raw-file layer and PEFT's directory format: nothing lost, nothing half-applied,
no crash on any file.

* Hostile files (FIFO, /dev/zero symlink, symlink loop, directory, socket, unreadable file, a huge
  declared header, a zip-bomb ``.bin``) are refused with a :class:`LoHaFormatError` naming the
  file, quickly, at every entry point of ``core/io.py`` and ``formats/peft.py``.
* Writes failing with EFBIG/ENOSPC raise an OSError naming the file; the old file is intact.
* float8 (and other unusual) dtypes load or are refused cleanly.
* Malformed configs (deep nesting, patterns failing in the target rules' form, catastrophic
  regexes) raise AdapterConfigError naming the file and field.
* Property-based (hypothesis): mutated safetensors headers and tensor files, mutated configs.
* Saves: a failure, an interrupt or a crash (``os._exit`` in a forked child) at every
  file-system step leaves the directory holding the whole old or the whole new adapter as
  lohakit reads it, and the next save leaves no temporary file.
* Loads: a KeyboardInterrupt at several points leaves the model bit-identical (module tree,
  tensors, requires_grad, hooks, every module attribute, adapter bookkeeping).
* Concurrency: a reader racing a writer gets the old adapter, the new one or AdapterChangedError;
  two concurrent writers leave one whole save.

The number of hypothesis examples is ``LOHAKIT_FUZZ_EXAMPLES`` (default: a CI-sized count);
``scripts/fuzz_io.py`` runs the same properties much longer and prints the outcome counts kept in
:data:`COUNTS`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lohakit
from lohakit import LoHaConfig, LoHaModel, get_peft_model
from lohakit.core import io as lio
from lohakit.formats import peft as pf

COUNTS: Counter[str] = Counter()
EXAMPLES = int(os.environ.get("LOHAKIT_FUZZ_EXAMPLES", "0")) or None
#: Crash/failure points of a save tried in CI (all of them with LOHAKIT_FUZZ_EXAMPLES set).
FAULT_STRIDE = 1


def fuzz(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples, deadline=None, derandomize=EXAMPLES is None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ------------------------------------------------------------------------------------------ models
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 5)
        self.lin2 = nn.Linear(5, 4)
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(4, 2)


def tiny() -> Tiny:
    torch.manual_seed(3)
    return Tiny().eval()


BASE_CONFIG = dict(r=2, alpha=3, target_modules=["lin1", "lin2", "conv"], init_weights=False)


def adapter(alpha: float, fill: float, **extra: Any) -> LoHaModel:
    """A LoHaModel whose every factor holds ``fill`` (so a file's origin is recognisable)."""
    lm = get_peft_model(tiny(), LoHaConfig(**{**BASE_CONFIG, "alpha": alpha, **extra}))
    with torch.no_grad():
        for _, layer in lm.loha_layers():
            for name in lohakit.LoHaLayer.adapter_layer_names:
                for p in getattr(layer, name).values():
                    p.fill_(fill)
    return lm


def version_of(lm: LoHaModel, name: str = "default") -> tuple[float, float]:
    """(alpha, fill) of a loaded adapter; raises if its factors are not one uniform fill."""
    fills = set()
    for _, layer in lm.loha_layers():
        for pname in lohakit.LoHaLayer.adapter_layer_names:
            if name in getattr(layer, pname):
                fills.update(getattr(layer, pname)[name].detach().flatten().tolist())
    assert len(fills) == 1, f"factors mix values {sorted(fills)[:5]}"
    return lm.peft_config[name].alpha, fills.pop()


OLD, NEW = (3.0, 1.0), (5.0, 2.0)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a load could change, by identity and by bits."""
    mods = {}
    for n, m in model.named_modules():
        attrs = {}
        for k, v in m.__dict__.items():
            if isinstance(v, dict):
                attrs[k] = ("dict", id(v), tuple((kk, id(vv)) for kk, vv in v.items()))
            elif isinstance(v, (list, set)):
                attrs[k] = (type(v).__name__, id(v), tuple(sorted(map(repr, v))) if isinstance(v, set) else tuple(map(repr, v)))
            else:
                attrs[k] = ("obj", id(v) if not isinstance(v, (bool, int, float, str, type(None))) else v)
        mods[n] = (type(m), id(m), attrs)
    return {
        "mods": mods,
        "tensors": {n: (id(t), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "cfg": repr(getattr(model, "peft_config", None)),
    }


def assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = fingerprint(model)
    assert after["mods"] == before["mods"]
    assert after["grad"] == before["grad"] and after["cfg"] == before["cfg"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (ident, t) in before["tensors"].items():
        assert after["tensors"][k][0] == ident and torch.equal(after["tensors"][k][1], t), k


def leftovers(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    d = tmp_path / "ad"
    adapter(*OLD).save_pretrained(str(d))
    return d


# ------------------------------------------------------------------------------------------ hostile files
@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail instead of hanging forever if a read blocks (a FIFO)."""

    def hang(*_: Any) -> None:
        raise TimeoutError("the read blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _make_hostile(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    elif kind == "loop":
        os.symlink(path.name + ".b", path)
        os.symlink(path.name, str(path) + ".b")
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "huge_header":
        path.write_bytes(struct.pack("<Q", 10**15) + b"{}" + b" " * 64)
    elif kind == "dangling":
        os.symlink("/nonexistent/file", path)
    else:
        raise AssertionError(kind)


HOSTILE = ["fifo", "dev_zero", "loop", "directory", "socket", "huge_header", "dangling"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_raw_readers_refuse_hostile_files(kind, tmp_path, alarm):
    p = tmp_path / "x.safetensors"
    if kind == "socket" and len(str(p)) > 100:
        pytest.skip("socket path too long")
    _make_hostile(kind, p)
    t0 = time.monotonic()
    for fn in (lohakit.load_state_dict, lio.read_safetensors_metadata, lambda q: lio.read_regular_file(q, 10)):
        with pytest.raises(lohakit.LoHaFormatError, match="x.safetensors"):
            fn(p)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("which", [pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME])
@pytest.mark.parametrize("kind", HOSTILE)
def test_peft_loads_refuse_hostile_files(kind, which, saved, alarm):
    if kind == "socket" and len(str(saved / which)) > 100:
        pytest.skip("socket path too long")
    (saved / which).unlink()
    _make_hostile(kind, saved / which)
    model = tiny()
    before = fingerprint(model)
    with pytest.raises(lohakit.LoHaFormatError, match=which.replace(".", r"\.")):
        LoHaModel.from_pretrained(model, str(saved))
    assert_same(model, before)
    if which == pf.ADAPTER_CONFIG_NAME:
        with pytest.raises(lohakit.LoHaFormatError, match=which.replace(".", r"\.")):
            pf.read_adapter_config(saved / which)


def test_unreadable_file_is_a_format_error(saved, monkeypatch):
    real_open = os.open

    def denied(path, flags, *a, **k):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(lio.os, "open", denied)
    with pytest.raises(lio.UnreadableFileError, match="permission denied"):
        lohakit.load_state_dict(saved / pf.SAFETENSORS_WEIGHTS_NAME)
    with pytest.raises(lio.UnreadableFileError, match=pf.SAFETENSORS_WEIGHTS_NAME):
        LoHaModel.from_pretrained(tiny(), str(saved))
    assert issubclass(lio.UnreadableFileError, ValueError)


def _zip_bomb(path: Path, inflated: int) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", b"\x00" * inflated)


def test_zip_bomb_bin_refused_before_torch_load(tmp_path, monkeypatch):
    p = tmp_path / "adapter_model.bin"
    _zip_bomb(p, 64 * 1024 * 1024)
    assert p.stat().st_size < 200_000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(lio.ResourceLimitError, match="inflate"):
        lohakit.load_state_dict(p)


def test_legacy_bin_still_loads(tmp_path):
    torch.save({"w": torch.arange(6.0)}, str(tmp_path / "a.bin"))
    assert torch.equal(lohakit.load_state_dict(tmp_path / "a.bin")["w"], torch.arange(6.0))


def test_header_cap_checked_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", lio.MAX_HEADER_BYTES + 1) + b" " * 16)
    reads = []
    real_read = os.read
    monkeypatch.setattr(lio.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(lio.ResourceLimitError, match="header claims"):
        lohakit.load_state_dict(p)
    assert sum(reads) <= 8


# ------------------------------------------------------------------------------------------ write errors
_EFBIG_CHILD = r"""
import os, resource, signal, sys, torch
import lohakit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    lohakit.save_state_dict({"w": torch.zeros(100_000)}, path)
except OSError as e:
    print("OSError", e.errno, str(path) in str(e))
except BaseException as e:
    print("other", type(e).__name__, e)
else:
    print("no error")
"""


def test_efbig_write_is_oserror_naming_file_old_intact(tmp_path):
    import subprocess

    p = tmp_path / "w.safetensors"
    lohakit.save_state_dict({"w": torch.ones(4)}, p)
    old = p.read_bytes()
    out = subprocess.run([sys.executable, "-c", _EFBIG_CHILD, str(p)], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.split() == ["OSError", str(errno.EFBIG), "True"], out.stdout + out.stderr
    assert p.read_bytes() == old and leftovers(tmp_path) == []


def test_enospc_in_save_pretrained_keeps_old_adapter(saved, monkeypatch):
    import safetensors.torch as sttorch

    old = {n: (saved / n).read_bytes() for n in (pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME)}

    def full(*a: Any, **k: Any) -> None:
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(sttorch, "save_file", full)
    with pytest.raises(OSError) as info:
        adapter(*NEW).save_pretrained(str(saved))
    assert info.value.errno == errno.ENOSPC and pf.SAFETENSORS_WEIGHTS_NAME in str(info.value)
    assert {n: (saved / n).read_bytes() for n in old} == old and leftovers(saved) == []


# ------------------------------------------------------------------------------------------ dtypes
FLOAT8 = [d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_factors_load(dtype, saved):
    path = saved / pf.SAFETENSORS_WEIGHTS_NAME
    sd = lohakit.load_state_dict(path)
    lohakit.save_state_dict({k: v.to(dtype) for k, v in sd.items()}, path, {"format": "pt"})
    lm = LoHaModel.from_pretrained(tiny(), str(saved))
    assert version_of(lm) == OLD  # 1.0 is exact in every float8 format
    bad = {k: v.to(dtype) for k, v in sd.items()}
    first = next(iter(bad))
    bad[first] = bad[first].float().fill_(float("nan")).to(dtype)
    lohakit.save_state_dict(bad, path, {"format": "pt"})
    with pytest.warns(lio.NonFiniteTensorWarning):
        LoHaModel.from_pretrained(tiny(), str(saved))
    model = tiny()
    before = fingerprint(model)
    with pytest.raises(lio.NonFiniteTensorError):
        LoHaModel.from_pretrained(model, str(saved), strict=True)
    assert_same(model, before)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint16, torch.bool, torch.complex64, torch.uint64], ids=str)
def test_unusual_factor_dtypes_refused_cleanly(dtype, saved):
    path = saved / pf.SAFETENSORS_WEIGHTS_NAME
    sd = lohakit.load_state_dict(path)
    lohakit.save_state_dict({k: torch.ones(v.shape).to(dtype) for k, v in sd.items()}, path, {"format": "pt"})
    with pytest.raises(lio.StateDictMismatchError, match="dtype"):
        LoHaModel.from_pretrained(tiny(), str(saved))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool, *FLOAT8], ids=str)
def test_tensor_is_finite_every_dtype(dtype):
    t = torch.ones(5, dtype=torch.float32).to(dtype)
    assert lio.tensor_is_finite(t)
    if dtype.is_floating_point:
        t2 = torch.tensor([1.0, float("inf"), 0.0]).to(dtype)
        assert not lio.tensor_is_finite(t2) or dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
        assert not lio.tensor_is_finite(torch.tensor([float("nan")]).to(dtype))


# ------------------------------------------------------------------------------------------ configs
def _write_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / pf.ADAPTER_CONFIG_NAME).read_text())
    cfg.update(changes)
    if "layers_pattern" in changes:  # only valid together with layers_to_transform
        cfg["layers_to_transform"] = [0]
    (d / pf.ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))


def test_deeply_nested_config_is_a_clear_error(saved):
    (saved / pf.ADAPTER_CONFIG_NAME).write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(lio.AdapterConfigError, match="deeper than"):
        LoHaModel.from_pretrained(tiny(), str(saved))
    with pytest.raises(lio.AdapterConfigError, match="deeper than"):
        pf.read_adapter_config(saved / pf.ADAPTER_CONFIG_NAME)


def test_oversized_config_refused(saved, monkeypatch):
    monkeypatch.setattr(pf, "MAX_JSON_BYTES", 100)
    with pytest.raises(lio.ResourceLimitError, match=pf.ADAPTER_CONFIG_NAME):
        LoHaModel.from_pretrained(tiny(), str(saved))


@pytest.mark.parametrize(
    "field,value",
    [
        ("alpha_pattern", {"(?i)lin1": 3}),
        ("rank_pattern", {"(?i)lin1": 3}),
        ("rank_pattern", {"lin1[": 3}),
        ("layers_pattern", "(?i)layers"),
        ("exclude_modules", "lin1("),
        ("target_modules", "(lin1"),
    ],
)
def test_patterns_failing_in_the_target_rules_are_refused_at_read(field, value, saved):
    _write_config(saved, **{field: value})
    with pytest.raises(lio.AdapterConfigError, match=field):
        pf.read_adapter_config(saved / pf.ADAPTER_CONFIG_NAME)
    model = tiny()
    before = fingerprint(model)
    with pytest.raises(lio.AdapterConfigError, match=field):
        LoHaModel.from_pretrained(model, str(saved))
    assert_same(model, before)


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_modules", "(.|.)*Z"),
        ("exclude_modules", "(a+)+$"),
        ("rank_pattern", {"(.|.)*Z": 2}),
        ("alpha_pattern", {"(x+x+)+y": 2}),
        ("layers_pattern", "(.|.)*Z"),
    ],
)
def test_catastrophic_patterns_refused_within_about_a_second(field, value, saved):
    _write_config(saved, **{field: value})
    t0 = time.monotonic()
    with pytest.raises(lio.AdapterConfigError, match=field):
        LoHaModel.from_pretrained(tiny(), str(saved))
    assert time.monotonic() - t0 < 3.5


def test_catastrophic_pattern_refused_outside_the_main_thread(saved):
    _write_config(saved, target_modules="(.|.)*Z")
    out: list[BaseException] = []

    def run() -> None:
        try:
            LoHaModel.from_pretrained(tiny(), str(saved))
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            out.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert not th.is_alive() and len(out) == 1 and isinstance(out[0], lio.AdapterConfigError), out


@pytest.mark.parametrize(
    "value", [r"(lin1|lin2|conv)", r".*\.?(lin1|lin2)", r"(\w+\.)*lin[12]", r"^(?!head).*(lin1|lin2|conv)$"]
)
def test_ordinary_patterns_still_load(value, tmp_path):
    lm = get_peft_model(tiny(), LoHaConfig(r=2, target_modules=value, rank_pattern={"lin.": 3}, alpha_pattern={r"lin\d": 4}))
    lm.save_pretrained(str(tmp_path))
    back = LoHaModel.from_pretrained(tiny(), str(tmp_path))
    assert sorted(n for n, _ in back.loha_layers()) == sorted(n for n, _ in lm.loha_layers())


def test_pattern_forms_follow_the_target_rules():
    """check_patterns compiles each pattern exactly as core/targets.py uses it (pinned here)."""
    import re

    from lohakit.core import targets

    names = ["lin1", "a.lin1", "a.xlin1", "model.layers.3.lin2", "conv", "x.conv.y"]
    keys = ["lin1", r"lin\d", r"layers\.3\.lin2", "conv|lin1"]
    cfg = LoHaConfig(r=2, target_modules=".*lin1", exclude_modules=r"a\..*", rank_pattern={k: 1 for k in keys})
    cfg.layers_pattern = "layers"  # (the config wants layers_to_transform too; only the form matters here)
    forms = {label: (form, mode) for label, form, mode in pf._pattern_forms(cfg)}
    for key in keys:
        form, _ = forms[f"rank_pattern key {key!r}"]
        for n in names:
            assert (re.match(form, n) is not None) == (targets.pattern_key([key], n) == key), (key, n)
    for n in names:
        assert (re.fullmatch(forms["exclude_modules"][0], n) is not None) == targets.is_excluded(cfg, n)
    lp_form = forms["layers_pattern 'layers'"][0]
    for n in ["model.layers.3.lin2", "layers.0.x.y"]:
        m = re.match(lp_form, n)
        assert (int(m.group(1)) if m else None) == targets.layer_index(n, "layers"), n


def test_alarm_timer_of_the_caller_survives(saved):
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.8)
        LoHaModel.from_pretrained(tiny(), str(saved))
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining <= 0.8
        time.sleep(remaining + 0.2)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------ property-based
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
ST_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "BOOL", "U16", "C64", "F4", "X", 7]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=4), JSON),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 600), min_size=2, max_size=2), JSON),
    }
)


def _outcome(fn: Callable[[], Any], family: str) -> None:
    """Run ``fn``; only success or a LoHaFormatError may come out. Counted in COUNTS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except lohakit.LoHaFormatError as e:
        COUNTS[f"{family}/refused:{type(e).__name__}"] += 1
        assert str(e), "empty message"
        return
    COUNTS[f"{family}/ok"] += 1


@fuzz(150)
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=10), ST_ENTRY, max_size=4),
    meta=st.one_of(st.none(), JSON),
    data=st.binary(max_size=600),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_mutated_safetensors_headers(tmp_path_factory, header, meta, data, raw):
    with _example_dir(tmp_path_factory) as d:
        _mutated_header(d, header, meta, data, raw)


@contextlib.contextmanager
def _example_dir(factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh directory per example, removed afterwards (numbered mktemp is O(n) per call)."""
    with tempfile.TemporaryDirectory(dir=factory.getbasetemp()) as d:
        yield Path(d)


def _mutated_header(d: Path, header: Any, meta: Any, data: bytes, raw: bytes | None) -> None:
    doc: dict[str, Any] = dict(header)
    if meta is not None:
        doc["__metadata__"] = meta
    head = raw if raw is not None else json.dumps(doc).encode()
    p = d / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(head)) + head + data)
    _outcome(lambda: lohakit.load_state_dict(p), "header")
    _outcome(lambda: lio.read_safetensors_metadata(p), "metadata")


@fuzz(60)
@given(data=st.data())
def test_mutated_adapter_files(tmp_path_factory, data):
    """Byte flips, truncations and key/dtype/shape rewrites of a real adapter, via from_pretrained."""
    with _example_dir(tmp_path_factory) as d:
        _mutated_adapter(d, data)


def _mutated_adapter(d: Path, data: Any) -> None:
    adapter(*OLD, rank_pattern={"conv": 1}, alpha_pattern={"lin1": 4}).save_pretrained(str(d))
    kind = data.draw(st.sampled_from(["flip_weights", "truncate", "tensors", "config_field", "config_bytes"]))
    w = d / pf.SAFETENSORS_WEIGHTS_NAME
    c = d / pf.ADAPTER_CONFIG_NAME
    if kind == "flip_weights":
        b = bytearray(w.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        w.write_bytes(bytes(b))
    elif kind == "truncate":
        b = w.read_bytes()
        w.write_bytes(b[: data.draw(st.integers(0, len(b) - 1))])
    elif kind == "tensors":
        sd = lohakit.load_state_dict(w)
        key = data.draw(st.sampled_from(sorted(sd)))
        op = data.draw(st.sampled_from(["drop", "rename", "dtype", "shape", "nan", "extra"]))
        if op == "drop":
            del sd[key]
        elif op == "rename":
            sd[key + data.draw(st.sampled_from(["x", ".default", "_", ""]))] = sd.pop(key)
        elif op == "dtype":
            sd[key] = sd[key].to(data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int32, torch.bool, *FLOAT8])))
        elif op == "shape":
            sd[key] = torch.ones(tuple(data.draw(st.lists(st.integers(0, 4), max_size=3))))
        elif op == "nan":
            sd[key] = sd[key].clone().fill_(float("nan"))
        else:
            sd["base_model.model." + data.draw(st.text("abc._", min_size=1, max_size=10))] = torch.ones(2)
        lohakit.save_state_dict(sd, w, {"format": "pt"})
    elif kind == "config_field":
        cfg = json.loads(c.read_text())
        field = data.draw(st.sampled_from(sorted(cfg) + ["unknown_key"]))
        cfg[field] = data.draw(JSON)
        c.write_text(json.dumps(cfg))
    else:
        b = bytearray(c.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        c.write_bytes(bytes(b))
    model = tiny()
    before = fingerprint(model)
    strict = data.draw(st.booleans())
    loaded: list[LoHaModel] = []
    try:
        _outcome(lambda: loaded.append(LoHaModel.from_pretrained(model, str(d), strict=strict)), f"adapter:{kind}")
    finally:
        if not loaded:
            assert_same(model, before)


# ------------------------------------------------------------------------------------------ interrupts mid-load
INTERRUPT_POINTS = [
    ("lohakit.core.layers.LoHaLayer.update_layer", 1),
    ("lohakit.core.layers.LoHaLayer.update_layer", 3),
    ("lohakit.formats.peft._fill", 1),
    ("lohakit.formats.peft._finish", 1),
    ("lohakit.core.model.LoHaModel._apply_active", 1),
    ("lohakit.core.model.ModulesToSaveWrapper.__init__", 1),
    ("torch.Tensor.copy_", 2),
]


def _patch_interrupt(monkeypatch: pytest.MonkeyPatch, dotted: str, at: int) -> None:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:-1]:
            owner = getattr(owner, attr)
        break
    real = getattr(owner, parts[-1])
    calls = {"n": 0}

    def wrapper(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, parts[-1], wrapper)


@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("point,at", INTERRUPT_POINTS, ids=[f"{p.rsplit('.', 1)[-1]}@{n}" for p, n in INTERRUPT_POINTS])
def test_interrupt_mid_load_leaves_model_bit_identical(entry, point, at, tmp_path, monkeypatch):
    d = tmp_path / "ad"
    adapter(*NEW, modules_to_save=["head"]).save_pretrained(str(d))
    if entry == "from_pretrained":
        model: nn.Module = tiny()
    else:
        model = get_peft_model(tiny(), LoHaConfig(r=1, target_modules=["lin1"], modules_to_save=["head"]))
        model.train()
        model.model.lin1.register_forward_hook(lambda *a: None)
    before = fingerprint(model)
    _patch_interrupt(monkeypatch, point, at)
    try:
        if entry == "from_pretrained":
            LoHaModel.from_pretrained(model, str(d))
        else:
            model.load_adapter(str(d), "other")
    except KeyboardInterrupt:
        COUNTS["interrupt/rolled_back"] += 1
    else:  # this point is not on this entry's path: the load simply succeeded
        COUNTS["interrupt/not_reached"] += 1
        assert entry == "load_adapter" and "ModulesToSaveWrapper" in point
        return
    monkeypatch.undo()
    assert_same(model, before)
    # and the model still works as before: the same load now succeeds
    if entry == "from_pretrained":
        assert version_of(LoHaModel.from_pretrained(model, str(d))) == NEW
    else:
        model.load_adapter(str(d), "other")
        assert version_of(model, "other") == NEW


# ------------------------------------------------------------------------------------------ faults in a save
FS_FUNCS = [
    (os, "replace"), (os, "rename"), (os, "fsync"), (os, "open"), (os, "mkdir"), (os, "chmod"),
    (os, "unlink"), (os, "rmdir"), (os, "close"), (lio, "open"),
]


class _Faults:
    """Counts file-system calls; ``action`` runs at call ``at`` (0: never)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, action: Callable[[str], None]) -> None:
        self.n = 0
        self.at = at
        self.action = action
        for owner, name in FS_FUNCS:
            real = open if owner is lio else getattr(owner, name)  # io.py's open() is the builtin
            monkeypatch.setattr(owner, name, self._wrap(name, real), raising=False)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            self.n += 1
            if self.n == self.at:
                self.action(name)
            return real(*a, **k)

        return call


def _count_save_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    d = tmp_path / "count"
    adapter(*OLD).save_pretrained(str(d), selected_adapters=None)
    lm = adapter(*NEW)
    with monkeypatch.context() as m:
        f = _Faults(m, 0, lambda name: None)
        lm.save_pretrained(str(d))
    return f.n


def _check_whole(d: Path, allowed: set[tuple[float, float]]) -> tuple[float, float]:
    v = version_of(LoHaModel.from_pretrained(tiny(), str(d)))
    assert v in allowed, v
    return v


def _fail(name: str) -> None:
    raise OSError(errno.EIO, f"injected failure in {name}")


def _interrupt(name: str) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["oserror", "interrupt"])
def test_fault_at_every_save_step(mode, tmp_path, monkeypatch):
    steps = _count_save_steps(tmp_path, monkeypatch)
    assert steps > 10
    outcomes: Counter[str] = Counter()
    new = adapter(*NEW)
    for k in range(1, steps + 1, FAULT_STRIDE):
        d = tmp_path / f"s{k}"
        adapter(*OLD).save_pretrained(str(d))
        with monkeypatch.context() as m:
            _Faults(m, k, _fail if mode == "oserror" else _interrupt)
            try:
                new.save_pretrained(str(d))
                outcomes["completed"] += 1
            except (OSError, KeyboardInterrupt):
                outcomes["raised"] += 1
        v = _check_whole(d, {OLD, NEW})
        outcomes[f"reads_{'new' if v == NEW else 'old'}"] += 1
        adapter(*OLD).save_pretrained(str(d))  # the next save leaves nothing behind
        assert leftovers(d) == [] and _check_whole(d, {OLD}) == OLD
    COUNTS.update({f"save_fault:{mode}/{k}": v for k, v in outcomes.items()})
    assert outcomes["raised"] > 0


def _fork_crash_save(d: Path, at: int, timeout: float = 60.0) -> str:
    """Save NEW over ``d`` in a forked child that dies (os._exit) at file-system call ``at``."""
    new = adapter(*NEW)
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the save
        try:
            mp = pytest.MonkeyPatch()
            _Faults(mp, at, lambda name: os._exit(17))
            new.save_pretrained(str(d))
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            os._exit(3)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {17: "crashed", 0: "completed"}.get(code, f"exit {code}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_crash_at_every_save_step(tmp_path, monkeypatch):
    steps = _count_save_steps(tmp_path, monkeypatch)
    outcomes: Counter[str] = Counter()
    for k in range(1, steps + 2, FAULT_STRIDE):
        d = tmp_path / f"c{k}"
        adapter(*OLD).save_pretrained(str(d))
        how = _fork_crash_save(d, k)
        assert how in ("crashed", "completed"), how
        outcomes[how] += 1
        v = _check_whole(d, {OLD, NEW})  # a committed crash is completed by this load
        outcomes[f"reads_{'new' if v == NEW else 'old'}"] += 1
        cfg = json.loads((d / pf.ADAPTER_CONFIG_NAME).read_text())
        assert cfg["alpha"] == v[0]  # after the load the files themselves agree
        adapter(*OLD).save_pretrained(str(d))
        assert leftovers(d) == []
    COUNTS.update({f"save_crash/{k}": v for k, v in outcomes.items()})
    assert outcomes["crashed"] >= steps - 1 and outcomes["reads_new"] > 0 and outcomes["reads_old"] > 0


def test_multi_adapter_save_is_one_transaction(tmp_path, monkeypatch):
    d = tmp_path / "multi"
    old = adapter(*OLD)
    old.add_adapter("other", LoHaConfig(r=1, alpha=1, target_modules=["lin2"]))
    old.save_pretrained(str(d))
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    new = adapter(*NEW)
    new.add_adapter("other", LoHaConfig(r=1, alpha=7, target_modules=["lin2"]))
    renames = {"n": 0}
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if ".lohakit-save-" in str(src) and "MANIFEST" not in str(src):
            renames["n"] += 1
            if renames["n"] == 3:  # the other adapter's files are half done: crash here
                raise SystemExit("simulated crash after the commit point")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(lio, "_roll_forward", _roll_forward_no_retry(lio._roll_forward))
    with pytest.raises(SystemExit):
        new.save_pretrained(str(d))
    monkeypatch.undo()
    changed = {p for p, b in before.items() if p.read_bytes() != b}
    assert changed, "the crash should have left a half-moved save on disk"
    lm = LoHaModel.from_pretrained(tiny(), str(d))  # completes the committed save
    lm.load_adapter(str(d / "other"), "other")
    assert version_of(lm) == NEW and lm.peft_config["other"].alpha == 7
    assert leftovers(d) == []


def _roll_forward_no_retry(real: Callable[..., None]) -> Callable[..., None]:
    state = {"first": True}

    def once(staging: Path, manifest: Any) -> None:
        if state["first"]:
            state["first"] = False
            return real(staging, manifest)
        raise SystemExit("the process is gone")

    return once


def test_pending_save_without_write_access_is_a_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    adapter(*OLD).save_pretrained(str(d))
    monkeypatch.setattr(lio, "_roll_forward", _roll_forward_no_retry(lambda s, m: (_ for _ in ()).throw(SystemExit())))
    with pytest.raises(SystemExit):
        adapter(*NEW).save_pretrained(str(d))
    monkeypatch.undo()
    assert any(p.name.startswith(".lohakit-save-") for p in d.iterdir())

    def denied(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(lio, "_roll_forward", denied)
    with pytest.raises(lio.AdapterChangedError, match="interrupted save"):
        LoHaModel.from_pretrained(tiny(), str(d))
    monkeypatch.undo()
    assert version_of(LoHaModel.from_pretrained(tiny(), str(d))) == NEW


def test_stale_single_file_temps_cleaned_by_next_write(tmp_path):
    p = tmp_path / "w.safetensors"
    (tmp_path / ".w.safetensors.abc123xy.tmp").write_bytes(b"junk")
    (tmp_path / ".other.safetensors.abc123xy.tmp").write_bytes(b"keep")
    lohakit.save_state_dict({"w": torch.ones(2)}, p)
    assert sorted(x.name for x in tmp_path.iterdir()) == [".other.safetensors.abc123xy.tmp", "w.safetensors"]


def test_uncommitted_staging_is_removed_by_next_save(saved):
    junk = saved / ".lohakit-save-0123456789abcdef.tmp"
    (junk / "files").mkdir(parents=True)
    (junk / "files" / "0").write_bytes(b"half")
    adapter(*NEW).save_pretrained(str(saved))
    assert leftovers(saved) == [] and _check_whole(saved, {NEW}) == NEW


def test_saved_files_stay_byte_identical_to_peft(tmp_path):
    import peft

    lm = adapter(*NEW)
    lm.save_pretrained(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "theirs"))
    for n in (pf.SAFETENSORS_WEIGHTS_NAME,):
        assert (tmp_path / "ours" / n).read_bytes() == (tmp_path / "theirs" / n).read_bytes()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME]


# ------------------------------------------------------------------------------------------ concurrency
def _reader_vs_writer(d: Path, seconds: float, writers: int = 1) -> Counter[str]:
    versions = [adapter(*OLD), adapter(*NEW)]
    versions[0].save_pretrained(str(d))
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            j = i
            while not stop.is_set():
                versions[j % 2].save_pretrained(str(d))
                j += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    seen: Counter[str] = Counter()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                v = version_of(LoHaModel.from_pretrained(tiny(), str(d)))
            except lio.AdapterChangedError:
                seen["changed_error"] += 1
                continue
            assert v in (OLD, NEW), v
            seen["old" if v == OLD else "new"] += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert _check_whole(d, {OLD, NEW}) and leftovers(d) == []
    return seen


def test_reader_racing_a_writer_never_mixes(tmp_path):
    seen = _reader_vs_writer(tmp_path / "race", 4.0 if EXAMPLES is None else 60.0)
    COUNTS.update({f"race/{k}": v for k, v in seen.items()})
    assert sum(seen.values()) > 10


def test_two_concurrent_writers_one_wins_whole(tmp_path):
    for trial in range(5 if EXAMPLES is None else 100):
        d = tmp_path / f"w{trial}"
        a, b = adapter(*OLD), adapter(*NEW)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def save(lm: LoHaModel, barrier: threading.Barrier = barrier, d: Path = d, errors: list = errors) -> None:
            try:
                barrier.wait()
                lm.save_pretrained(str(d))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        ts = [threading.Thread(target=save, args=(m,)) for m in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        v = _check_whole(d, {OLD, NEW})
        assert json.loads((d / pf.ADAPTER_CONFIG_NAME).read_text())["alpha"] == v[0]
        assert leftovers(d) == []
        COUNTS[f"two_writers/{'new' if v == NEW else 'old'}"] += 1
    # and with readers as well
    seen = _reader_vs_writer(tmp_path / "two", 3.0 if EXAMPLES is None else 30.0, writers=2)
    COUNTS.update({f"race2/{k}": v for k, v in seen.items()})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_reader_racing_a_writer_process(tmp_path):
    d = tmp_path / "proc"
    versions = [adapter(*OLD), adapter(*NEW)]
    versions[0].save_pretrained(str(d))
    pid = os.fork()
    if pid == 0:
        try:
            end = time.monotonic() + (3.0 if EXAMPLES is None else 60.0)
            j = 1
            while time.monotonic() < end:
                versions[j % 2].save_pretrained(str(d))
                j += 1
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            os._exit(3)
    seen: Counter[str] = Counter()
    try:
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            try:
                v = version_of(LoHaModel.from_pretrained(tiny(), str(d)))
            except lio.AdapterChangedError:
                seen["changed_error"] += 1
                continue
            assert v in (OLD, NEW)
            seen["old" if v == OLD else "new"] += 1
    finally:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, 0)
    COUNTS.update({f"race_process/{k}": v for k, v in seen.items()})
    assert seen["old"] + seen["new"] > 5 and leftovers(d) == []


def test_reader_detects_a_swap_between_its_reads(saved, monkeypatch):
    """A writer that is not lohakit (no commit record) replacing a file mid-read is detected."""
    other = saved.parent / "other"
    adapter(*NEW).save_pretrained(str(other))
    real = lio._read_fd
    calls = {"n": 0}

    def read_then_swap(fd: int, st: os.stat_result, path: Path, cap: Any, what: str) -> bytes:
        data = real(fd, st, path, cap, what)
        calls["n"] += 1
        if calls["n"] == 1:
            os.replace(other / pf.SAFETENSORS_WEIGHTS_NAME, saved / pf.SAFETENSORS_WEIGHTS_NAME)
        return data

    monkeypatch.setattr(lio, "_read_fd", read_then_swap)
    monkeypatch.setattr(lio, "READ_ATTEMPTS", 1)
    with pytest.raises(lio.AdapterChangedError, match="changed while it was read"):
        LoHaModel.from_pretrained(tiny(), str(saved))


def test_helpers_for_other_readers(saved, tmp_path):
    """read_adapter (inspect/convert) and load_safetensors_with_metadata (kohya) apply the same checks."""
    source, config, tensors = pf.read_adapter(saved)
    assert config.alpha == OLD[0] and all(k.startswith(pf.KEY_PREFIX) for k in tensors)
    w = saved / pf.SAFETENSORS_WEIGHTS_NAME
    sd, meta = lio.load_safetensors_with_metadata(w)
    assert meta == {"format": "pt"} and sd.keys() == tensors.keys()
    _make_hostile("fifo", tmp_path / "f.safetensors")
    with pytest.raises(lio.UnreadableFileError, match="FIFO"):
        lio.load_safetensors_with_metadata(tmp_path / "f.safetensors")


def teardown_module() -> None:
    print(f"\n[reliability] outcomes: {dict(sorted(COUNTS.items()))}")
