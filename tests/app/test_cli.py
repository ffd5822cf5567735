"""The ``lohakit`` command: help and exit codes, inspect (‖ΔW‖_F through the factors), convert, merge.

Tolerances: ‖ΔW‖_F from the factored form vs ``get_delta_weight().norm()`` in float32 factors,
computed in float64: 1e-6 relative. Merged model outputs vs the unmerged LoHa model: float32,
atol 1e-5.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lohakit import LoHaConfig, LoHaModel
from lohakit.app.cli import main
from lohakit.app.inspection import factored_frobenius, inspect_adapter

SUBCOMMANDS = ["train", "demo", "inspect", "convert", "merge"]


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]])
def test_help_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "usage: lohakit" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], ["COMMAND"]),
        (["frobnicate"], ["invalid choice", "frobnicate"]),
        (["convert", "a", "b"], ["--to"]),
        (["convert", "a", "b", "--to", "onnx"], ["onnx"]),
        (["merge", "--base", "x"], ["--adapter", "--out"]),
        (["inspect"], ["path"]),
    ],
)
def test_bad_usage_exits_2_with_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    if argv:
        assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lohakit ")


def test_python_dash_m_one_line_error_and_debug_traceback():
    r = subprocess.run([sys.executable, "-m", "lohakit", "inspect", "/no/such/adapter"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "/no/such/adapter" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lohakit", "--debug", "inspect", "/no/such/adapter"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


# ------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.tconv = nn.Conv2d(6, 5, 3, padding=1)
        self.pw = nn.Conv1d(5, 7, 1)


def _adapted(tucker: bool) -> LoHaModel:
    torch.manual_seed(0)
    cfg = LoHaConfig(r=3, alpha=5, init_weights=False, use_effective_conv2d=tucker, target_modules=["lin", "conv", "tconv", "pw"],
                     rank_pattern={"^lin$": 2}, alpha_pattern={"^pw$": 1.5})
    return LoHaModel(Net(), cfg)


@pytest.mark.parametrize("tucker", [False, True])
def test_inspect_peft_dir_norms_match_materialised(tucker, tmp_path, capsys):
    m = _adapted(tucker)
    m.save_pretrained(str(tmp_path / "a"))
    rep = inspect_adapter(tmp_path / "a")
    rows = {r["module"]: r for r in rep["modules"]}
    assert set(rows) == {"lin", "conv", "tconv", "pw"}
    for path, layer in m.loha_layers():
        r = rows[path]
        expected = layer.get_delta_weight("default").double().norm().item()
        assert r["delta_norm"] == pytest.approx(expected, rel=1e-6), path
        assert r["rank"] == layer.r["default"] and r["alpha"] == pytest.approx(layer.alpha["default"])
        assert r["scale"] == pytest.approx(layer.scaling["default"])
        assert r["params"] == sum(getattr(layer, n)["default"].numel() for n in layer.adapter_layer_names if "default" in getattr(layer, n))
        assert r["dtype"] == "float32"
    assert rows["lin"]["shape"] == [10, 12] and rows["lin"]["rank"] == 2 and rows["pw"]["alpha"] == 1.5
    assert rows["tconv"]["tucker"] is tucker and rows["lin"]["tucker"] is False
    if tucker:
        assert rows["tconv"]["shape"] == [5, 6, 3, 3]
    assert rep["totals"]["params"] == sum(r["params"] for r in rows.values())
    assert main(["inspect", str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    assert "‖ΔW‖_F" in table and "total: 4 modules" in table
    assert main(["inspect", "--json", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["modules"] == 4


def test_factored_frobenius_never_needs_big_matrix_and_is_exact_in_float64():
    torch.manual_seed(1)
    f = {"hada_w1_a": torch.randn(50, 4, dtype=torch.float64), "hada_w1_b": torch.randn(4, 70, dtype=torch.float64),
         "hada_w2_a": torch.randn(50, 3, dtype=torch.float64), "hada_w2_b": torch.randn(3, 70, dtype=torch.float64)}
    dw = 0.7 * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    assert factored_frobenius(f, 0.7) == pytest.approx(dw.norm().item(), rel=1e-12)


def test_inspect_kohya_file(tmp_path, capsys):
    m = _adapted(True)
    m.save_pretrained(str(tmp_path / "a"))
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "k.safetensors"), "--to", "kohya", "--prefix", "lora_te"]) == 0
    rep = inspect_adapter(tmp_path / "k.safetensors")
    peft_rep = inspect_adapter(tmp_path / "a")
    assert rep["format"] == "kohya"
    by_norm = sorted(r["delta_norm"] for r in rep["modules"])
    assert by_norm == pytest.approx(sorted(r["delta_norm"] for r in peft_rep["modules"]), rel=2e-3)  # fp16 storage
    assert {r["dtype"] for r in rep["modules"]} == {"float16"}
    assert all(r["module"].startswith("lora_te_") for r in rep["modules"])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "missing", ["does not exist"]),
        (lambda d: (d / "e").mkdir() or d / "e", ["no adapter_config.json"]),
        (lambda d: (d.joinpath("x.bin").write_bytes(b"\x80\x04K."), d / "x.bin")[1], ["expected a PEFT directory"]),
        (lambda d: (d.joinpath("bad.safetensors").write_bytes(b"\x00" * 40), d / "bad.safetensors")[1], ["bad.safetensors", "not a valid safetensors"]),
    ],
)
def test_inspect_bad_paths(make, words, tmp_path, capsys):
    p = make(tmp_path)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


# ------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_convert_to_lora_is_exact_and_rank_compresses(tmp_path, capsys):
    import peft

    torch.manual_seed(0)
    m = LoHaModel(Tiny(), LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=["a", "b"]))
    m.save_pretrained(str(tmp_path / "loha"))
    x = torch.randn(5, 8)
    want = m(x)
    assert main(["convert", str(tmp_path / "loha"), str(tmp_path / "lora"), "--to", "lora"]) == 0
    assert "exact" in capsys.readouterr().out
    base = Tiny()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.model.state_dict().items() if "hada" not in k})
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    torch.testing.assert_close(lora(x), want, rtol=1e-5, atol=1e-6)
    assert main(["convert", str(tmp_path / "loha"), str(tmp_path / "lora2"), "--to", "lora", "--rank", "1"]) == 0
    assert "worst relative error" in capsys.readouterr().out
    # existing output: refused, untouched
    before = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "loha"), str(tmp_path / "lora"), "--to", "lora"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    base.save_pretrained(str(d / "base"))
    m = LoHaModel(base, LoHaConfig(r=2, alpha=4, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    m.save_pretrained(str(d / "adapter"))
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        hidden = m.model.model(input_ids=ids).last_hidden_state
        logits = m(input_ids=ids).logits
    return d, ids, hidden, logits


def test_convert_kohya_round_trip_through_peft(llama_and_adapter, tmp_path, capsys):
    d, ids, _, logits = llama_and_adapter
    k = tmp_path / "k.safetensors"
    assert main(["convert", str(d / "adapter"), str(k), "--to", "kohya", "--prefix", "lora_te"]) == 0
    assert main(["convert", str(k), str(tmp_path / "p"), "--to", "peft", "--prefix", "lora_te", "--base", str(d / "base")]) == 0
    from transformers import AutoModelForCausalLM

    back = LoHaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(d / "base")), str(tmp_path / "p"))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, logits, rtol=1e-2, atol=1e-3)  # fp16 kohya storage
    assert main(["convert", str(k), str(tmp_path / "p2"), "--to", "peft"]) == 2
    assert "--base" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------
def test_merge_writes_sharded_dir_loadable_with_automodel(llama_and_adapter, tmp_path, capsys):
    from transformers import AutoModel, AutoModelForCausalLM

    d, ids, hidden, logits = llama_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(out), "--max-shard-size", "60KB"]) == 0
    assert "merged 6 modules" in capsys.readouterr().out
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(AutoModel.from_pretrained(str(out))(input_ids=ids).last_hidden_state, hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(out))(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    # an existing output is refused and left as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(out), "--overwrite"]) == 0
    assert len(list(out.glob("*.safetensors"))) == 1  # default shard size: one file


@pytest.mark.parametrize(
    "which, words",
    [("adapter", ["adapter", "does not exist"]), ("base", ["base model directory", "does not exist"])],
)
def test_merge_bad_paths(which, words, llama_and_adapter, tmp_path, capsys):
    d, *_ = llama_and_adapter
    base, adapter = str(d / "base"), str(d / "adapter")
    if which == "adapter":
        adapter = str(tmp_path / "nope")
    else:
        base = str(tmp_path / "nope")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words)
    assert not (tmp_path / "o").exists()


def test_merge_given_a_kohya_file_says_to_convert_first(llama_and_adapter, tmp_path, capsys):
    d, *_ = llama_and_adapter
    kohya = tmp_path / "style.safetensors"
    kohya.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(kohya), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kohya/LyCORIS single-file adapter" in err and "lohakit convert" in err, err
    assert not (tmp_path / "o").exists()


# merge --overwrite never loses OUT ---------------------------------------------------------
def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture()
def merged_once(llama_and_adapter, tmp_path):
    from lohakit.app.merge import merge_to_dir

    d, *_ = llama_and_adapter
    out = tmp_path / "merged"
    merge_to_dir(d / "base", d / "adapter", out, max_shard_size="60KB")
    (out / "mine.txt").write_text("kept")  # a file of the old OUT that the new one does not have
    return d, out, _tree(out)


def test_merge_overwrite_second_rename_failing_keeps_old_out(merged_once, monkeypatch):
    from lohakit.app import merge as merge_mod

    d, out, before = merged_once
    monkeypatch.setattr(merge_mod, "_exchange", lambda a, b: False)  # the two-rename path
    real, calls = os.replace, []

    def failing(src, dst, *a, **k):
        calls.append((str(src), str(dst)))
        if os.path.basename(str(src)).startswith(f".{out.name}.staged-"):  # the second rename
            raise OSError(errno.EIO, "injected failure")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
    assert any(os.path.basename(s) == out.name for s, _ in calls)  # OUT was set aside first ...
    assert _tree(out) == before and _leftovers(out) == []  # ... and put back, nothing left behind


def test_merge_overwrite_exchange_failing_keeps_old_out(merged_once, monkeypatch):
    from lohakit.app import merge as merge_mod

    d, out, before = merged_once

    def broken(a, b):
        raise OSError(errno.EIO, "injected exchange failure")

    monkeypatch.setattr(merge_mod, "_exchange", broken)
    with pytest.raises(OSError, match="injected"):
        merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
    assert _tree(out) == before and _leftovers(out) == []


@pytest.mark.parametrize("where", ["save", "side files"])
def test_merge_overwrite_failing_while_staging_keeps_old_out(where, merged_once, monkeypatch):
    from lohakit.app import merge as merge_mod

    d, out, before = merged_once
    if where == "save":
        from transformers import PreTrainedModel

        def boom(self, *a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
        exc = KeyboardInterrupt
    else:
        def boom(*a, **k):
            raise OSError(errno.ENOSPC, "injected disk full")

        monkeypatch.setattr(merge_mod, "_sync_tree", boom)
        exc = OSError
    with pytest.raises(exc):
        merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
    assert _tree(out) == before and _leftovers(out) == []


def test_merge_overwrite_replaces_out_whole(merged_once):
    from lohakit.app.merge import merge_to_dir

    d, out, before = merged_once
    merge_to_dir(d / "base", d / "adapter", out, overwrite=True)  # default shard size: one file
    names = sorted(p.name for p in out.iterdir())
    assert "mine.txt" not in names and "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert ".lohakit-staging" not in names and _leftovers(out) == []


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _mark(d, pid=None, start=None):
    """The marker lohakit writes first into a staging (here: of a process that is gone)."""
    import socket

    (d / ".lohakit-staging").write_text(json.dumps(
        {"lohakit": "staging", "pid": pid or _dead_pid(), "host": socket.gethostname(), "start": start}))
    return d


def _user_dir(parent, name):
    d = parent / name
    d.mkdir()
    (d / "precious.txt").write_text(name)
    return d


def test_merge_after_a_crash_between_the_renames_puts_old_out_back(merged_once, capsys):
    d, out, before = merged_once
    old = out.with_name(f".{out.name}.old-0123456789ab")
    os.rename(out, old)  # a crash right after OUT was set aside (it was marked before the rename)
    _mark(old)
    stale = out.with_name(f".{out.name}.staged-ba9876543210")
    stale.mkdir()
    _mark(stale)
    (stale / "partial.safetensors").write_bytes(b"x")
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # the restored OUT counts as existing
    assert _tree(out) == before and _leftovers(out) == []  # marker dropped from the restored OUT too


def test_merge_recovery_touches_only_dead_marked_stagings_of_its_own_names(merged_once, monkeypatch):
    """A user's .OUT.old-backup, an unmarked or badly named staging and a live merge's staging survive."""
    from lohakit.app import merge as merge_mod

    d, out, _ = merged_once
    parent = out.parent
    keep = [
        _user_dir(parent, f".{out.name}.old-backup"),
        _mark(_user_dir(parent, f".{out.name}.staged-inprogress")),  # not an id lohakit generates
        _user_dir(parent, f".{out.name}.old-0123456789ab"),  # right name, no marker
        _user_dir(parent, f".{out.name}.staged-0123456789AB"),
    ]
    live = _user_dir(parent, f".{out.name}.staged-aaaaaaaaaaaa")
    merge_mod._write_marker(live)  # this process: alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = _mark(_user_dir(parent, f".{out.name}.staged-bbbbbbbbbbbb"), pid=sleeper.pid)  # another live process
        keep_trees = {p.name: _tree(p) for p in [*keep, live, other]}
        dead = _mark(_user_dir(parent, f".{out.name}.staged-cccccccccccc"))
        reused = _mark(_user_dir(parent, f".{out.name}.convert-dddddddddddd"), pid=os.getpid(), start=-1)  # pid reused
        from transformers import PreTrainedModel

        real, seen = PreTrainedModel.save_pretrained, []

        def spy(self, save_dir, *a, **k):  # the marker is there before anything is written
            seen.append(json.loads((merge_mod.Path(save_dir) / ".lohakit-staging").read_text())["pid"])
            return real(self, save_dir, *a, **k)

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", spy)
        merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
        assert seen == [os.getpid()]
        assert not dead.exists() and not reused.exists()
        assert {p.name: _tree(p) for p in [*keep, live, other]} == keep_trees
        assert "mine.txt" not in _tree(out) and ".lohakit-staging" not in _tree(out)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_merge_with_out_missing_never_renames_a_user_folder_into_out(llama_and_adapter, tmp_path):
    from lohakit.app.merge import merge_to_dir

    d, *_ = llama_and_adapter
    out = tmp_path / "merged"
    user = [_user_dir(tmp_path, ".merged.old-backup"), _user_dir(tmp_path, ".merged.old-0123456789ab")]
    merge_to_dir(d / "base", d / "adapter", out)  # OUT missing: nothing is "put back", OUT is written
    assert (out / "model.safetensors").is_file() and not (out / "precious.txt").exists()
    assert all((u / "precious.txt").read_text() == u.name for u in user)


def test_stale_staging_recovery_runs_under_the_directory_lock(tmp_path):
    import threading
    import time

    from lohakit.app.merge import recover_stagings
    from lohakit.core.io import _dir_lock

    out = tmp_path / "merged"
    dead = _mark(_user_dir(tmp_path, ".merged.staged-0123456789ab"))
    with _dir_lock(tmp_path) as locked:
        if not locked:
            pytest.skip("no flock here")
        t = threading.Thread(target=recover_stagings, args=(out,))
        t.start()
        time.sleep(0.3)
        assert dead.exists()  # waits for the lock holder (a PEFT save or a swap in progress)
    t.join(10)
    assert not t.is_alive() and not dead.exists()


def test_merge_into_a_mount_point_is_refused(merged_once, monkeypatch, capsys):
    d, out, before = merged_once
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out.resolve()) or real(p))
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(out), "--overwrite"]) == 2
    _one_line_error(capsys, ["is a mount point", "write to a subdirectory of it"])
    assert _tree(out) == before and _leftovers(out) == []
    assert main(["convert", str(d / "adapter"), str(out), "--to", "lora", "--overwrite"]) == 2
    _one_line_error(capsys, ["is a mount point", "write to a subdirectory of it"])
    assert _tree(out) == before and _leftovers(out) == []


def test_merge_into_a_symlinked_out_keeps_the_link(merged_once, capsys):
    d, out, _ = merged_once
    link = out.with_name("link")
    link.symlink_to(out, target_is_directory=True)
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert "mine.txt" not in names and "model.safetensors" in names  # the target holds the new content
    assert _leftovers(out) == [] and _leftovers(link) == []


@pytest.mark.parametrize("where, words", [(".", "is the current directory"), ("..", "holding the current directory"),
                                          ("/", "filesystem root")])
def test_merge_out_dot_or_root_is_refused_clearly(where, words, llama_and_adapter, tmp_path, monkeypatch, capsys):
    d, *_ = llama_and_adapter
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out", where, "--overwrite"]) == 2
    _one_line_error(capsys, [words])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and list(work.iterdir()) == []


def test_merge_exchange_really_runs_renameat2(merged_once, monkeypatch):
    from lohakit.app import merge as merge_mod

    real = merge_mod._renameat2()
    if real is None:
        pytest.skip("no renameat2 here (not Linux / old libc)")
    d, out, _ = merged_once
    results, replaced = [], []

    def spy(*args):
        results.append(real(*args))
        return results[-1]

    real_replace = os.replace
    monkeypatch.setattr(merge_mod, "_renameat2", lambda: spy)
    monkeypatch.setattr(os, "replace", lambda a, b, *x, **k: (replaced.append(os.path.basename(str(a))), real_replace(a, b, *x, **k))[1])
    merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
    assert results == [0]  # the atomic exchange ran and succeeded ...
    assert not any(n == out.name or n.startswith(f".{out.name}.staged-") for n in replaced)  # ... no renames instead
    names = sorted(p.name for p in out.iterdir())
    assert "mine.txt" not in names and ".lohakit-staging" not in names and "model.safetensors" in names
    assert _leftovers(out) == []


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
def test_merge_exchange_unsupported_errno_falls_back_to_renames(err, merged_once, monkeypatch):
    import ctypes

    from lohakit.app import merge as merge_mod

    d, out, _ = merged_once
    calls, replaced = [], []

    def fake_renameat2(*args):  # a libc/kernel/filesystem without RENAME_EXCHANGE
        calls.append(args)
        ctypes.set_errno(err)
        return -1

    real_replace = os.replace
    monkeypatch.setattr(merge_mod, "_renameat2", lambda: fake_renameat2)
    monkeypatch.setattr(os, "replace", lambda a, b, *x, **k: (replaced.append((os.path.basename(str(a)), os.path.basename(str(b)))), real_replace(a, b, *x, **k))[1])
    merge_mod.merge_to_dir(d / "base", d / "adapter", out, overwrite=True)
    assert len(calls) == 1
    assert any(a == out.name and b.startswith(f".{out.name}.old-") for a, b in replaced)  # OUT set aside ...
    assert any(a.startswith(f".{out.name}.staged-") and b == out.name for a, b in replaced)  # ... staged put in
    names = sorted(p.name for p in out.iterdir())
    assert "mine.txt" not in names and ".lohakit-staging" not in names and "model.safetensors" in names
    assert _leftovers(out) == []


def test_convert_recovers_what_a_killed_convert_left(tmp_path, capsys):
    a = tmp_path / "a"
    _adapted(False).save_pretrained(str(a))
    # a file output: a SIGKILLed convert left its marked staging directory
    k = tmp_path / "o.safetensors"
    dead = _mark(_user_dir(tmp_path, ".o.safetensors.convert-0123456789ab"))
    user = _user_dir(tmp_path, ".o.safetensors.convert-backup")
    assert main(["convert", str(a), str(k), "--to", "kohya", "--prefix", "lora_te"]) == 0
    assert k.is_file() and not dead.exists() and (user / "precious.txt").is_file()
    # a directory output: a crash between the two renames left OUT set aside, plus the staging
    lora = tmp_path / "lora"
    assert main(["convert", str(a), str(lora), "--to", "lora"]) == 0
    before = _tree(lora)
    old = tmp_path / ".lora.old-0123456789ab"
    os.rename(lora, old)
    _mark(old)
    staged = _mark(_user_dir(tmp_path, ".lora.convert-ba9876543210"))
    capsys.readouterr()
    assert main(["convert", str(a), str(lora), "--to", "lora"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # the restored OUT counts as existing
    assert _tree(lora) == before and not old.exists() and not staged.exists()
    assert main(["convert", str(a), str(lora), "--to", "lora", "--overwrite"]) == 0
    assert _tree(lora) == before and _leftovers(lora) == []


# malformed tensors in inspect / convert: LoHaFormatError (exit 2, one line), never a crash ----
_K = "base_model.model."


def _peft_mut(fn):
    def apply(sd):
        fn(sd)
        return sd
    return apply


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value(sd[key]) if callable(value) else value)


def _drop(key):
    return lambda sd: sd.pop(key)


def _nan(key, v=float("nan")):
    def f(sd):
        t = sd[key].clone()
        t.view(-1)[0] = v
        sd[key] = t
    return f


PEFT_CASES = [
    # (id, tucker, mutation, words in the one-line error)
    ("w1_b_rank_3_against_rank_2", False, _set(_K + "lin.hada_w1_b", lambda t: torch.randn(3, t.shape[1])), ["lin.hada_w1_b", "rank"]),
    ("w2_a_other_out_rows", False, _set(_K + "lin.hada_w2_a", lambda t: torch.randn(t.shape[0] + 1, t.shape[1])), ["lin.hada_w2_a"]),
    ("w2_b_other_in", False, _set(_K + "lin.hada_w2_b", lambda t: torch.randn(t.shape[0], t.shape[1] - 1)), ["lin.hada_w2_b"]),
    ("zero_dim_w1_a", False, _set(_K + "lin.hada_w1_a", torch.tensor(1.0)), ["lin.hada_w1_a", "2 dimensions"]),
    ("one_dim_w1_b", False, _set(_K + "lin.hada_w1_b", lambda t: t.reshape(-1)), ["lin.hada_w1_b"]),
    ("empty_rank", False, lambda sd: [sd.__setitem__(k, torch.zeros(*(0 if i == d else s for i, s in enumerate(sd[k].shape))))
                                      for k, d in ((_K + "lin.hada_w1_a", 1), (_K + "lin.hada_w1_b", 0),
                                                   (_K + "lin.hada_w2_a", 1), (_K + "lin.hada_w2_b", 0))], ["lin.hada_", "empty"]),
    ("nan", False, _nan(_K + "conv.hada_w2_b"), ["conv.hada_w2_b", "NaN"]),
    ("inf", False, _nan(_K + "lin.hada_w1_a", float("inf")), ["lin.hada_w1_a", "inf"]),
    ("int_factor", False, _set(_K + "lin.hada_w1_a", lambda t: t.to(torch.int32)), ["lin.hada_w1_a", "dtype"]),
    ("t1_without_t2", True, _drop(_K + "tconv.hada_t2"), ["tconv", "hada_t1"]),
    ("t1_wrong_rank", True, _set(_K + "tconv.hada_t1", lambda t: torch.randn(t.shape[0], t.shape[1] + 1, *t.shape[2:])), ["tconv.hada_t1"]),
    ("t2_other_kernel", True, _set(_K + "tconv.hada_t2", lambda t: torch.randn(*t.shape[:2], 1, 1)), ["tconv.hada_t2", "kernel"]),
    ("tucker_w1_a_3d", True, _set(_K + "tconv.hada_w1_a", lambda t: t.unsqueeze(-1)), ["tconv.hada_w1_a"]),
    ("missing_factor", False, _drop(_K + "pw.hada_w2_a"), ["pw", "hada_w2_a"]),
]


def _mutated_peft(tmp_path, tucker, mutation):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "a"
    _adapted(tucker).save_pretrained(str(d))
    sd = load_file(str(d / "adapter_model.safetensors"))
    mutation(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
    return d


def _one_line_error(capsys, words):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err, err
    assert all(w in err for w in words), (words, err)


@pytest.mark.parametrize("case", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
@pytest.mark.parametrize("command", ["inspect", "convert-lora", "convert-kohya"])
def test_malformed_peft_tensors_exit_2_with_one_line(case, command, tmp_path, capsys):
    _, tucker, mutation, words = case
    d = _mutated_peft(tmp_path, tucker, mutation)
    out = tmp_path / ("o.safetensors" if command == "convert-kohya" else "o")
    argv = {"inspect": ["inspect", str(d)], "convert-lora": ["convert", str(d), str(out), "--to", "lora"],
            "convert-kohya": ["convert", str(d), str(out), "--to", "kohya", "--prefix", "lora_te"]}[command]
    assert main(argv) == 2
    _one_line_error(capsys, words)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def _kohya_file(tmp_path, mutation=None):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "a"
    _adapted(False).save_pretrained(str(d))
    k = tmp_path / "k.safetensors"
    assert main(["convert", str(d), str(k), "--to", "kohya", "--prefix", "lora_te"]) == 0
    if mutation is not None:
        sd = load_file(str(k))
        mutation(sd)
        save_file({n: v.contiguous() for n, v in sd.items()}, str(k))
    return k


KOHYA_CASES = [
    ("alpha_nan", lambda sd: sd.__setitem__("lora_te_lin.alpha", torch.tensor(float("nan"))), ["lora_te_lin.alpha", "finite"]),
    ("w1_b_rank", _set("lora_te_lin.hada_w1_b", lambda t: torch.randn(t.shape[0] + 1, t.shape[1]).half()), ["lora_te_lin.hada_w1_b"]),
    ("w2_a_one_dim", _set("lora_te_lin.hada_w2_a", lambda t: t.reshape(-1)), ["lora_te_lin.hada_w2_a"]),
    ("nan_factor", _nan("lora_te_conv.hada_w1_b"), ["lora_te_conv.hada_w1_b", "NaN"]),
    ("scalar_factor", _set("lora_te_pw.hada_w2_b", torch.tensor(2.0)), ["lora_te_pw.hada_w2_b"]),
    ("alpha_not_one_number", _set("lora_te_lin.alpha", torch.ones(3, 3)), ["lora_te_lin.alpha", "single number"]),  # found by a fuzz run
]


@pytest.mark.parametrize("case", KOHYA_CASES, ids=[c[0] for c in KOHYA_CASES])
@pytest.mark.parametrize("command", ["inspect", "convert-lora"])
def test_malformed_kohya_tensors_exit_2_with_one_line(case, command, tmp_path, capsys):
    _, mutation, words = case
    k = _kohya_file(tmp_path, mutation)
    capsys.readouterr()
    out = tmp_path / "o.safetensors"
    argv = ["inspect", str(k)] if command == "inspect" else ["convert", str(k), str(out), "--to", "lora"]
    assert main(argv) == 2
    _one_line_error(capsys, words)
    assert not out.exists()


def test_unequal_branch_ranks_inspect_but_do_not_convert(tmp_path, capsys):
    def unequal(sd):
        sd["lora_te_lin.hada_w2_a"] = torch.randn(10, 3).half()
        sd["lora_te_lin.hada_w2_b"] = torch.randn(3, 12).half()

    k = _kohya_file(tmp_path, unequal)
    capsys.readouterr()
    assert main(["inspect", "--json", str(k)]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)["modules"]}
    assert rows["lora_te_lin"]["rank"] == [2, 3]
    assert main(["convert", str(k), str(tmp_path / "o.safetensors"), "--to", "lora"]) == 2
    _one_line_error(capsys, ["lora_te_lin.hada_w2_b", "equal branch ranks"])


def test_float8_factors_inspect_and_convert(tmp_path, capsys):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    d = _mutated_peft(tmp_path, False, _set(_K + "lin.hada_w1_a", lambda t: t.to(torch.float8_e4m3fn)))
    assert main(["inspect", str(d)]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out
    assert main(["convert", str(d), str(tmp_path / "o.safetensors"), "--to", "kohya", "--prefix", "lora_te"]) == 0


def test_convert_checks_its_output_before_the_final_rename(tmp_path, capsys, monkeypatch):
    """An output the loaders would refuse (here: a writer producing NaN) never replaces OUT."""
    from lohakit.formats import kohya as kohya_fmt

    d = tmp_path / "a"
    _adapted(False).save_pretrained(str(d))
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    real = kohya_fmt._entries_state_dict

    def poisoned(*a, **k):
        sd, meta = real(*a, **k)
        key = next(n for n in sd if n.endswith("hada_w1_a"))
        sd[key] = torch.full_like(sd[key], float("nan"))
        return sd, meta

    monkeypatch.setattr(kohya_fmt, "_entries_state_dict", poisoned)
    assert main(["convert", str(d), str(out), "--to", "kohya", "--prefix", "lora_te", "--overwrite"]) == 2
    _one_line_error(capsys, ["loaders refuse", str(out), "NaN"])
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "o.safetensors"]
