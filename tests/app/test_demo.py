"""``lohakit demo`` end to end (``--quick`` sizes): every figure computed, cache reused, round trip exact.

The full-size demo is the same code with larger DemoSettings; its wall time is measured by hand
(see the README), not asserted here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lohakit.app.cli import main
from lohakit.app.demo import DemoSettings, code_corpus, default_cache_dir, run_demo


def test_default_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lohakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lohakit"


def test_code_corpus_holds_out_other_modules():
    train, held, train_files, held_files = code_corpus(50_000, 5_000)
    assert train and held and not set(train_files) & set(held_files)
    assert "def " in train and "def " in held


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["demo", "--quick"]) == 0  # default cache dir under XDG_CACHE_HOME
    out = capsys.readouterr().out
    cache = tmp_path / "xdg" / "lohakit"
    summary = json.loads((cache / "demo-output-quick" / "demo_summary.json").read_text())
    assert summary["ok"] and not summary["base_cached"]
    assert summary["merge_max_abs_err"] <= 1e-4 and summary["reload_max_abs_err"] <= 1e-5
    s = DemoSettings.quick()
    assert summary["settings"] == {k: getattr(s, k) for k in summary["settings"]}
    # every printed figure comes from the run
    assert f"{summary['code_ppl_before']:.3f} -> {summary['loha']['ppl_after']:.3f}" in out
    assert f"trainable {summary['trainable_params']:,} of {summary['total_params']:,}" in out
    assert f"{100 * summary['trainable_params'] / summary['total_params']:.2f}%" in out
    assert summary["lora"]["params"] == summary["trainable_params"]  # equal parameter count
    assert f"{summary['lora']['ppl_after']:.3f}" in out
    for v in (summary["code_ppl_before"], summary["loha"]["ppl_after"], summary["prose_ppl"]):
        assert math.isfinite(v) and 1.0 < v < 256.0
    png = Path(summary["loss_curve"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    adapter = Path(summary["adapter_dir"])
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert "merged == unmerged" in out
    from lohakit.app.demo import relative_change

    assert f"({relative_change(summary['code_ppl_before'], summary['loha']['ppl_after'])})" in out

    # second run: the base comes from the cache and gives the same "before" perplexity
    again = run_demo(cache_dir=cache, output_dir=tmp_path / "o2", quick=True, with_lora=False, echo=lambda _: None)
    assert again["base_cached"] and again["base_path"] == summary["base_path"]
    assert again["code_ppl_before"] == pytest.approx(summary["code_ppl_before"], rel=1e-6)
    assert again["lora"] is None


def test_demo_rebuilds_a_damaged_cache(tmp_path):
    s = DemoSettings(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, seq_len=32, batch=2,
                     pretrain_steps=2, adapt_steps=2, eval_blocks=4, code_train_bytes=5_000, code_eval_bytes=2_000)
    first = run_demo(cache_dir=tmp_path, output_dir=tmp_path / "o", settings=s, with_lora=False, echo=lambda _: None)
    base = Path(first["base_path"])
    (base / "model.safetensors").write_bytes(b"garbage")
    second = run_demo(cache_dir=tmp_path, output_dir=tmp_path / "o", settings=s, with_lora=False, echo=lambda _: None)
    assert not second["base_cached"] and second["ok"]
    assert second["code_ppl_before"] == pytest.approx(first["code_ppl_before"], rel=1e-5)  # same seed, same base


def test_relative_change_reads_the_sign_out():
    from lohakit.app.demo import relative_change

    assert relative_change(22.821, 23.058) == "1.0% higher"  # was printed as "(-1.0% lower)"
    assert relative_change(23.058, 22.821) == "1.0% lower"
    assert relative_change(10.0, 10.001) == "unchanged"
    assert relative_change(0.0, 1.0) == "change undefined"


def test_demo_help_says_what_is_written(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "temporary" not in text and "merged model," not in text
    assert "demo-output" in text and "not written" in text
