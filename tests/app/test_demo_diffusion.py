"""``lohakit demo diffusion``: its parts (data, tokenizer, pipeline, judge, grid) and the quick mode end to end.

The full-size demo is the same code with the default DiffusionDemoSettings; its wall time is
measured by hand, not asserted here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lohakit.app import demo_diffusion as dd
from lohakit.app.demo_diffusion import DiffusionDemoSettings, run_diffusion_demo


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return dd.digit_images(16)


def test_digit_images_and_split(digits):
    images, labels = digits
    assert images.shape == (1797, 16, 16) and images.dtype == torch.uint8 and labels.shape == (1797,)
    assert int(images.max()) == 255 and int(images.min()) == 0
    s = DiffusionDemoSettings()
    split = dd.split_digits(labels, s)
    sets = {k: set(v.tolist()) for k, v in split.items()}
    for a, sa in sets.items():
        for b, sb in sets.items():
            assert a == b or not sa & sb
    assert set(labels[split["base_train"]].tolist()) == set(s.base_digits)
    assert set(labels[split["new_train"]].tolist()) == set(s.new_digits) == set(labels[split["new_eval"]].tolist())
    n_new = int(sum((labels == d).sum() for d in s.new_digits))
    assert split["new_eval"].numel() == math.ceil(n_new / s.new_held_out_every)
    pix = dd.to_pixels(images[:3])
    assert pix.shape == (3, 3, 16, 16) and float(pix.min()) >= -1 and float(pix.max()) <= 1


def test_captions_tokenize_to_one_token_per_word(tmp_path):
    tok = dd.build_tokenizer(tmp_path / "tok", max_tokens=8)
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    ids = tok(dd.caption_for(7), padding="max_length", max_length=8).input_ids
    assert tok.convert_ids_to_tokens(ids)[:6] == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]
    assert len({tok(dd.caption_for(d)).input_ids[4] for d in range(10)}) == 10


def test_image_folder_reads_back(tmp_path, digits):
    images, labels = digits
    idx = torch.tensor([0, 5, 17])
    assert dd.write_image_folder(tmp_path / "imgs", images, labels, idx) == 3
    from PIL import Image

    for i in idx.tolist():
        stem = f"digit{int(labels[i])}_{i:04d}"
        im = Image.open(tmp_path / "imgs" / f"{stem}.png")
        assert im.mode == "RGB" and im.size == (16, 16)
        assert torch.equal(torch.from_numpy(np.asarray(im.convert("L")).copy()), images[i])
        assert (tmp_path / "imgs" / f"{stem}.txt").read_text() == dd.caption_for(int(labels[i]))
    from lohakit.app.imagedata import scan_images

    items, _ = scan_images(str(tmp_path / "imgs"))
    assert sorted(it.caption for it in items) == sorted(dd.caption_for(int(labels[i])) for i in idx.tolist())


def test_pipeline_saves_as_a_real_sd_pipeline(tmp_path, digits):
    from diffusers import StableDiffusionPipeline

    from lohakit.formats.families import family_of_pipeline

    s = DiffusionDemoSettings.quick()
    pipe = dd.build_pipeline(s, tmp_path, seed=0)
    images, _ = digits
    pix = dd.to_pixels(images[:64])
    info = dd.train_vae(pipe.vae, pix, pix[:8], s, seed=0)
    assert info["rmse"] > 0 and math.isfinite(info["scaling_factor"]) and pipe.vae.config.scaling_factor == info["scaling_factor"]
    pipe.save_pretrained(str(tmp_path / "pipe"))
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert family_of_pipeline(again).name == "sd"
    assert again.unet.config.sample_size * 2 ** (len(again.vae.config.block_out_channels) - 1) == s.resolution
    out = dd.generate_digits(dd.load_pipeline(tmp_path / "pipe"), [7, 8], 2, s, seed=1)
    assert out.shape == (4, 3, 16, 16) and float(out.min()) >= -1 and float(out.max()) <= 1
    again2 = dd.generate_digits(dd.load_pipeline(tmp_path / "pipe"), [7, 8], 2, s, seed=1)
    assert torch.equal(out, again2)  # fixed seed: the same images


def test_heldout_loss_is_fixed_and_uses_the_trainers_objective(tmp_path, digits):
    s = DiffusionDemoSettings.quick()
    pipe = dd.build_pipeline(s, tmp_path, seed=0)
    images, labels = digits
    obj = dd.objective_of(pipe)
    held = dd.heldout_set(obj, dd.to_pixels(images[:6]), [dd.caption_for(int(y)) for y in labels[:6]], seed=3, draws=2)
    assert held.latents.shape[0] == 12 and len(held.seeds) == 12
    a = dd.heldout_loss(obj, pipe.unet, held)
    b = dd.heldout_loss(obj, pipe.unet, held, chunk=5)
    assert math.isfinite(a) and abs(a - b) < 1e-5
    with torch.no_grad():
        manual = float(obj.loss(pipe.unet, held.latents, held.cond, held.seeds).mean())
    assert abs(a - manual) < 1e-5


def test_lora_rank_matches_loha_count():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    from lohakit import LoHaConfig, LoHaModel

    loha = LoHaModel(model, LoHaConfig(r=4, alpha=4, target_modules=["0", "2"]))
    n = loha.get_nb_trainable_parameters()[0]
    rank, count = dd.lora_rank_for(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)), ["0", "2"], n)
    assert (rank, count) == (8, n)
    with pytest.raises(ValueError):
        dd.lora_rank_for(model, ["nothing"], n)


def test_classifier_reads_real_digits(digits):
    images, labels = digits
    s = DiffusionDemoSettings.quick()
    clf, acc, n = dd.train_classifier(images, labels, s, seed=0)
    assert n == 360 and 0.3 < acc <= 1.0  # 30 steps already beat chance (10%) by far
    pred = dd.classify(clf, dd.to_pixels(images[:10]))
    assert pred.shape == (10,) and pred.dtype == torch.long


def test_sample_grid_png(tmp_path):
    rows = {"base": torch.rand(6, 3, 16, 16) * 2 - 1, "LoHa": torch.zeros(6, 3, 16, 16)}
    path = tmp_path / "grid.png"
    dd.write_sample_grid(path, rows, [7, 8, 9], per_digit=2, cols_per_digit=2, accuracies={"base": 0.5})
    from PIL import Image

    im = Image.open(path)
    assert im.size[1] == 18 + 2 * (64 + 2) and im.size[0] > 3 * 2 * 64


@pytest.mark.slow
def test_diffusion_demo_quick_end_to_end(tmp_path):
    lines: list[str] = []
    s = DiffusionDemoSettings.quick()
    out = tmp_path / "out"
    summary = run_diffusion_demo(s, out, tmp_path / "cache", lines.append)
    text = "\n".join(lines)
    assert summary["ok"] and not summary["base_cached"]
    assert summary["reload_max_abs_err"] <= 1e-4 and summary["merge_max_abs_err"] <= 1e-4
    # every printed figure comes from the run
    assert f"trainable {summary['trainable_params']:,} of {summary['total_params']:,}" in text
    assert f"{summary['heldout_loss_new_before']:.4f} -> {summary['loha']['heldout_loss_new']:.4f}" in text
    assert f"{100 * summary['accuracy_before']:.1f}% -> {100 * summary['loha']['accuracy']:.1f}%" in text
    assert f"accuracy {100 * summary['classifier_accuracy']:.1f}%" in text
    assert f"RMSE {summary['base']['vae']['rmse']:.4f}" in text
    assert abs(summary["lora"]["params"] - summary["trainable_params"]) <= 0.05 * summary["trainable_params"]
    assert f"{summary['lora']['params']:,} parameters" in text
    assert f"{summary['reload_max_abs_err']:.2e}" in text and f"{summary['merge_max_abs_err']:.2e}" in text
    png = Path(summary["sample_grid"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(summary["kohya_file"]).is_file()
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(summary["base_path"], local_files_only=True)  # a real pipeline directory
    assert json.loads((out / "diffusion_demo_summary.json").read_text())["ok"]
    # second run: the base comes from the cache and says so
    lines2: list[str] = []
    again = run_diffusion_demo(s, out, tmp_path / "cache", lines2.append)
    assert again["base_cached"] and any("loaded from cache" in ln for ln in lines2)
    assert again["base_path"] == summary["base_path"]
    assert again["heldout_loss_new_before"] == summary["heldout_loss_new_before"]
