"""``lohakit train``: outputs, config files, resume == uninterrupted, Ctrl-C, seq-cls, bad input.

Tiny byte-level Llama models built from configs (no download); a few optimiser steps each.
Tolerances: float32 losses of a resumed vs uninterrupted run agree to 1e-6 relative (the same
operations in the same order; only the round trip through safetensors sits in between, which
is exact for float32).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from lohakit.app.cli import main
from lohakit.app.train import TrainConfig, TrainInterrupted, load_config_file, train

PROSE = (
    "The quick brown fox jumps over the lazy dog. A LoHa adapter multiplies two low-rank matrices "
    "element by element, so its rank can exceed the sum of the two ranks. "
) * 12


def make_llama(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama2") / "model", seed=1)


@pytest.fixture()
def data_txt(tmp_path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(PROSE, encoding="utf-8")
    return p


def base_args(model: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--save-every", "2", "-r", "2",
            "--target-modules", "q_proj,v_proj", "--no-progress", "--lr", "5e-3"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of everything under d (to prove nothing was touched)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))} if d.exists() else {}


# ------------------------------------------------------------------------------------------
def test_train_cli_writes_everything(llama_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(base_args(llama_dir, data_txt, out)) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png",
            "train_config.json", "checkpoint-2", "checkpoint-4"} <= names
    assert not [n for n in names if n.startswith(".")], names  # no temporary leftovers
    ck = out / "checkpoint-2"
    assert {p.name for p in ck.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    m = read_metrics(out)
    steps = [r["step"] for r in m if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in m if "loss" in r)
    evals = [r for r in m if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the curve starts at the base model
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(torch.tensor(r["eval_loss"]).exp().item(), rel=1e-6)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "eval ppl" in printed
    banner = printed.splitlines()[:3]
    assert "LlamaForCausalLM" in banner[0] and "parameters trainable (" in banner[0] and "%)" in banner[0]
    assert "UTF-8 bytes" in banner[1] and " train / " in banner[1]
    assert banner[2].startswith("4 steps of 4 samples")
    # the final adapter is a PEFT directory that peft itself loads
    import peft
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["r"] == 2
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(out))
    assert sum("hada_w1_a" in n for n, _ in pm.named_parameters()) == 4


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_config_files_and_flag_override(suffix, tmp_path):
    from lohakit.app.cli import _train_config, build_parser

    body = {
        ".yaml": "model: m\ndata: d.txt\noutput_dir: o\nmax_steps: 7\nloha:\n  r: 4\n  target_modules: [q_proj]\n",
        ".json": json.dumps({"model": "m", "data": "d.txt", "output_dir": "o", "max_steps": 7, "loha": {"r": 4, "target_modules": ["q_proj"]}}),
        ".toml": 'model = "m"\ndata = "d.txt"\noutput_dir = "o"\nmax_steps = 7\n[loha]\nr = 4\ntarget_modules = ["q_proj"]\n',
    }[suffix]
    path = tmp_path / f"cfg{suffix}"
    path.write_text(body)
    assert load_config_file(path)["max_steps"] == 7
    args = build_parser().parse_args(["train", str(path), "--lr", "0.01", "--alpha", "8", "--loha", "rank_dropout=0.1"])
    cfg = _train_config(args)
    assert (cfg.model, cfg.max_steps, cfg.lr) == ("m", 7, 0.01)
    assert cfg.loha == {"r": 4, "target_modules": ["q_proj"], "alpha": 8, "rank_dropout": 0.1}


def test_resume_matches_uninterrupted_run(llama_dir, data_txt, tmp_path):
    """Stop at step 3 (the Ctrl-C path), resume to 6: same losses and adapter as 6 steps straight."""
    common = dict(model=str(llama_dir), data=str(data_txt), seq_len=32, batch_size=4, max_steps=6, eval_every=0,
                  save_every=0, lr=5e-3, warmup_steps=2, lr_scheduler="cosine", progress=False,
                  loha={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "rank_dropout": 0.3})
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), **common))
    with pytest.raises(TrainInterrupted) as exc:
        train(TrainConfig(output_dir=str(tmp_path / "part"), **common), should_stop=lambda step: step == 3)
    assert exc.value.step == 3 and exc.value.checkpoint.name == "checkpoint-3"
    state = json.loads((exc.value.checkpoint / "trainer_state.json").read_text())
    assert state["reason"] == "interrupted" and state["step"] == 3
    resumed = train(TrainConfig(output_dir=str(tmp_path / "part"), resume=True, **common))
    assert resumed["step"] == 6
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    la = [r["loss"] for r in a if "loss" in r]
    lb = [r["loss"] for r in b if "loss" in r]
    assert len(la) == len(lb) == 6
    assert lb == pytest.approx(la, rel=1e-6, abs=1e-7)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    from lohakit import load_state_dict

    sa = load_state_dict(tmp_path / "full" / "adapter_model.safetensors")
    sb = load_state_dict(tmp_path / "part" / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigint_saves_checkpoint(llama_dir, data_txt, tmp_path):
    from helpers.processes import last_checkpoint_state, lohakit_ctrl_c_after

    out = tmp_path / "out"
    args = base_args(llama_dir, data_txt, out, steps=100000)
    args[args.index("--save-every") + 1] = "0"
    args[args.index("--eval-every") + 1] = "0"
    code, err = lohakit_ctrl_c_after(args, out, steps=3)
    assert code == 130, err
    state = last_checkpoint_state(out)
    assert state is not None, err
    assert state["reason"] == "interrupted" and state["step"] >= 3
    assert "checkpoint saved" in err.strip().splitlines()[-1]
    assert (out / "loss_curve.png").is_file()


def test_seq_cls_on_csv_and_jsonl(llama_dir, tmp_path):
    rows = [("a fine day, sunny and warm", "pos"), ("rain and cold wind all day", "neg")] * 12
    csv_p = tmp_path / "d.csv"
    csv_p.write_text("sentence,label\n" + "".join(f'"{t}",{l}\n' for t, l in rows))
    jl = tmp_path / "e.jsonl"
    jl.write_text("".join(json.dumps({"sentence": t, "label": l}) + "\n" for t, l in rows[:6]))
    res = train(TrainConfig(model=str(llama_dir), data=str(csv_p), eval_data=str(jl), output_dir=str(tmp_path / "o"), task="seq-cls",
                            text_field="sentence", seq_len=32, batch_size=4, max_steps=3, eval_every=0, save_every=0,
                            progress=False, loha={"r": 2, "target_modules": ["q_proj", "v_proj"]}))
    assert 0.0 <= res["eval_accuracy"] <= 1.0 and res["eval_loss"] > 0
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]  # the new classification head trains in full
    st = json.loads((tmp_path / "o" / "checkpoint-3" / "trainer_state.json").read_text())
    assert st["label_names"] == ["neg", "pos"]


TOY = textwrap.dedent(
    '''
    import torch, torch.nn as nn

    class Toy(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.emb = nn.Embedding(256, dim)
            self.proj = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, 256)

        def forward(self, input_ids, attention_mask=None):
            return self.head(torch.tanh(self.proj(self.emb(input_ids))))

    def build(dim=16):
        torch.manual_seed(0)
        return Toy(dim)
    '''
)


def test_model_by_import_path(data_txt, tmp_path, monkeypatch):
    (tmp_path / "toy_models_lohakit.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = train(TrainConfig(model="toy_models_lohakit:build", model_kwargs={"dim": 8}, data=str(data_txt), output_dir=str(tmp_path / "o"),
                            seq_len=16, batch_size=2, max_steps=3, eval_every=0, save_every=0, progress=False,
                            loha={"r": 2, "target_modules": ["proj"]}))
    assert res["step"] == 3 and res["eval_ppl"] > 1
    assert res["trainable_params"] == 2 * 2 * (8 + 8)


# ------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the thing, exit code 2, nothing overwritten
# ------------------------------------------------------------------------------------------
def _no_weights(tmp: Path, llama: Path) -> Path:
    d = tmp / "noweights"
    d.mkdir()
    (d / "config.json").write_text((llama / "config.json").read_text())
    return d


BAD_CASES = {
    # name: (mutate args, setup(tmp, llama_dir, data) -> replacements, expected words in the message)
    "missing data file": (lambda a, t, m, d: _set(a, "--data", str(t / "nope.txt")), ["nope.txt", "does not exist"]),
    "data is a directory": (lambda a, t, m, d: _set(a, "--data", str(t)), ["is not a file"]),
    "data not utf-8": (lambda a, t, m, d: (t.joinpath("bin.txt").write_bytes(b"\xff\xfe\x00abc"), _set(a, "--data", str(t / "bin.txt")))[1], ["bin.txt", "UTF-8"]),
    "unsupported data type": (lambda a, t, m, d: (t.joinpath("x.parquet").write_text("x"), _set(a, "--data", str(t / "x.parquet")))[1], ["x.parquet", ".jsonl"]),
    "empty data set": (lambda a, t, m, d: (t.joinpath("empty.txt").write_text(""), _set(a, "--data", str(t / "empty.txt")))[1], ["empty.txt", "empty"]),
    "jsonl without text field": (lambda a, t, m, d: (t.joinpath("x.jsonl").write_text('{"body": "hi"}\n'), _set(a, "--data", str(t / "x.jsonl")))[1], ["x.jsonl:1", "'text'"]),
    "unknown loha key": (lambda a, t, m, d: a + ["--loha", "rnk=4"], ["rnk", "valid keys"]),
    "target matches nothing": (lambda a, t, m, d: _set(a, "--target-modules", "no_such_proj"), ["no_such_proj", "matched no module"]),
    "model dir without weights": (lambda a, t, m, d: _set(a, "--model", str(_no_weights(t, m))), ["noweights", "no weights"]),
    "model neither dir nor import path": (lambda a, t, m, d: _set(a, "--model", str(t / "missing-model")), ["missing-model", "neither"]),
    "bad flag value": (lambda a, t, m, d: _set(a, "--max-steps", "0"), ["max_steps", ">= 1"]),
    "unknown flag": (lambda a, t, m, d: a + ["--lerning-rate", "1"], ["--lerning-rate"]),
}


def _set(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_exit_2(case, llama_dir, data_txt, tmp_path, capsys):
    mutate, words = BAD_CASES[case]
    out = tmp_path / "out"
    args = mutate(base_args(llama_dir, data_txt, out), tmp_path, llama_dir, data_txt)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err
    assert not out.exists()  # nothing was written


def test_unknown_config_key_lists_valid_ones(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: d.txt\noutput_dir: o\nlearning_rate: 0.1\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "valid keys" in err and "'lr'" in err


def test_existing_output_dir_needs_overwrite(llama_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "metrics.jsonl").write_text("old\n")
    before = snapshot(out)
    assert main(base_args(llama_dir, data_txt, out, steps=2)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
    assert snapshot(out) == before
    assert main(base_args(llama_dir, data_txt, out, steps=2) + ["--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "mine"  # --overwrite only replaces lohakit's own files
    assert (out / "metrics.jsonl").read_text() != "old\n"


def test_resume_from_another_base_model_refused(llama_dir, other_llama_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(base_args(llama_dir, data_txt, out, steps=2)) == 0
    before = snapshot(out)
    capsys.readouterr()
    args = _set(base_args(llama_dir, data_txt, out, steps=4), "--model", str(other_llama_dir)) + ["--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another base model" in err and "checkpoint-2" in err
    assert snapshot(out) == before


def test_resume_without_checkpoint(llama_dir, data_txt, tmp_path, capsys):
    assert main(base_args(llama_dir, data_txt, tmp_path / "none") + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_model_dir_tokenizer_is_used(tmp_path):
    """A model directory with a tokenizer trains on its ids (not bytes); vocab checked against the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PROSE.replace(".", " .").replace(",", " ,").split()))
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_dir = make_llama(tmp_path / "wl")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]").save_pretrained(str(model_dir))
    from lohakit.app.textdata import load_tokenizer

    tok = load_tokenizer(model_dir)
    assert tok.name != "bytes" and tok.encode("The quick")[:2] == [vocab["The"], vocab["quick"]]
    data = tmp_path / "d.txt"
    data.write_text(PROSE.replace(".", " .").replace(",", " ,"))
    res = train(TrainConfig(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "o"), seq_len=8, batch_size=2,
                            max_steps=2, eval_every=0, save_every=0, progress=False, loha={"r": 2, "target_modules": ["q_proj"]}))
    assert res["step"] == 2 and math.isfinite(res["eval_loss"])


@pytest.mark.parametrize(
    "extra",
    [
        {"grad_accum": 2, "loha": {"r": 2, "module_dropout": 0.9, "target_modules": ["q_proj"]}},  # often no adapter at all
        {"mixed_precision": "bf16", "lr_scheduler": "constant", "warmup_steps": 1},
        {"eval_data": "SAME", "eval_fraction": 0.0},
    ],
    ids=["accum+module_dropout", "bf16", "eval_file"],
)
def test_training_options(extra, llama_dir, data_txt, tmp_path):
    extra = dict(extra)
    if extra.get("eval_data") == "SAME":
        extra["eval_data"] = str(data_txt)
    kw = dict(model=str(llama_dir), data=str(data_txt), output_dir=str(tmp_path / "o"), seq_len=32, batch_size=2, max_steps=3,
              eval_every=0, save_every=0, progress=False, loha={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    kw.update(extra)
    res = train(TrainConfig(**kw))
    assert res["step"] == 3 and math.isfinite(res["train_loss"]) and math.isfinite(res["eval_loss"])


# ------------------------------------------------------------------------------------------ issue 13
def make_gpt2(path: Path, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=n_positions, n_embd=16, n_layer=1, n_head=2)).save_pretrained(str(path))
    return path


def test_seq_len_past_the_model_positions_refused_before_writing(llama_dir, data_txt, tmp_path, capsys):
    gpt2 = make_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out"
    args = base_args(gpt2, data_txt, out)
    args[args.index("--seq-len") + 1] = "128"
    args[args.index("--target-modules") + 1] = "c_attn"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seq-len 128" in err and "n_positions = 64" in err, err
    assert not out.exists()
    args = base_args(llama_dir, data_txt, out)
    args[args.index("--seq-len") + 1] = "129"  # max_position_embeddings = 128: refused too, not trained silently
    assert main(args) == 2 and "max_position_embeddings = 128" in capsys.readouterr().err
    assert not out.exists()


def test_failed_start_leaves_no_output_directory(llama_dir, data_txt, tmp_path, monkeypatch, capsys):
    from lohakit.app import train as train_mod

    def broken(*a, **k):
        raise RuntimeError("simulated failure in the first step")

    monkeypatch.setattr(train_mod, "_batch_loss", broken)
    out = tmp_path / "out"
    assert main(base_args(llama_dir, data_txt, out)) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in a reused directory stays, lohakit's go
    assert main(base_args(llama_dir, data_txt, out) + ["--overwrite"]) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resume_with_max_steps_not_above_the_checkpoint(llama_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(base_args(llama_dir, data_txt, out, steps=4)) == 0
    before = snapshot(out)
    capsys.readouterr()
    for steps in ("3", "4"):
        args = base_args(llama_dir, data_txt, out, steps=int(steps)) + ["--resume"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--max-steps {steps} is not above the step of checkpoint-4 (4)" in err, err
    assert snapshot(out) == before
    assert main(base_args(llama_dir, data_txt, out, steps=6) + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from checkpoint-4 (step 4 of 6)" in printed
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_default_learning_rate_follows_the_width():
    from lohakit.app.train import default_lr

    assert default_lr({"hidden_size": 128}) == pytest.approx(3e-2)  # capped at the measured optimum
    assert default_lr({"hidden_size": 256}) == pytest.approx(6 / 256)
    assert default_lr({"n_embd": 4096}) == pytest.approx(6 / 4096)
    assert default_lr(None) == pytest.approx(1e-2)
    assert TrainConfig(model="m", data="d", output_dir="o").lr is None
    with pytest.raises(ValueError, match="'lr' must be a positive number"):
        TrainConfig.from_dict({"model": "m", "data": "d", "output_dir": "o", "lr": 0})
