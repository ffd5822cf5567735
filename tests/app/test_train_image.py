"""``lohakit train --task text-to-image`` on tiny saved pipelines of every family.

Invariants per family (sd1, sd2v, sdxl, flux, sd3): a few steps train; the PEFT adapter
directory and the kohya file both reload onto a fresh pipeline and give the same denoiser loss
(float32 file: 1e-6 relative); the adapter is not zero (the loss differs from the base's).
Then, on SD1 (cheapest): resume reproduces the uninterrupted losses exactly, the cache is reused
and invalidated as stated, bad inputs exit 2 with nothing written, samples, text encoder, convs,
EMA, config files; and a 2-process gloo run equals 1 process at the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.pipelines import make_image_folder, make_pipeline_dir, make_truncated_image, make_uncaptioned_image
from lohakit.app.cli import main
from lohakit.app.train import TrainInterrupted
from lohakit.app.train_image import ImageTrainConfig, train_text_to_image

FAMILIES = ["sd1", "sd2v", "sdxl", "flux", "sd3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {f: make_pipeline_dir(f, root) for f in FAMILIES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", n=4)


def _cfg(model: Path, data: Path, out: Path, **kw) -> ImageTrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), resolution=32, batch_size=2, max_steps=2,
                save_every=0, lr=1e-2, loha={"r": 2, "alpha": 2}, cache_dir=str(out.parent / "cache"), progress=False,
                save_dtype="fp32", cpu=True)
    base.update(kw)
    return ImageTrainConfig(**base)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _fresh(model: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model)).to(torch.float32)


def _fixed_loss(pipe, family: str) -> float:
    """The objective of ``pipe`` on fixed latents, captions and draws (for comparing adapters)."""
    from lohakit.app.objectives import objective_for

    fam = {"sd1": "sd", "sd2v": "sd"}.get(family, family)
    obj = objective_for(pipe, fam)
    g = torch.Generator().manual_seed(0)
    c = obj.denoiser.config.in_channels if fam != "flux" else obj.denoiser.config.in_channels // 4
    latents = torch.randn(2, c, 8, 8, generator=g)
    with torch.no_grad():
        cond = obj.encode_prompts(["a red thing", "a blue thing"], "cpu")
        return float(obj.loss(obj.denoiser, latents, cond, [11, 12]).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_both_outputs_reload(family, pipes, images, tmp_path):
    from lohakit import LoHaModel
    from lohakit.diffusers import load_loha_weights
    from lohakit.formats.kohya import read_kohya_file

    out = tmp_path / "out"
    res = train_text_to_image(_cfg(pipes[family], images, out))
    comp = "unet" if family in ("sd1", "sd2v", "sdxl") else "transformer"
    assert res["step"] == 2 and len(_losses(out)) == 2
    assert res["adapters"] == {comp: str(out / comp)}
    assert (out / comp / "adapter_config.json").is_file() and (out / "loss_curve.png").is_file()
    kohya = Path(res["kohya_file"])
    assert kohya == out / "loha.safetensors"
    _, meta, _ = read_kohya_file(str(kohya))
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_steps"] == "2"
    freq = json.loads(meta["ss_tag_frequency"])
    assert set(freq) == {"data"} and sum(freq["data"].values()) == 4

    base = _fixed_loss(_fresh(pipes[family]), family)
    p1 = _fresh(pipes[family])
    LoHaModel.from_pretrained(getattr(p1, comp), str(out / comp))
    via_peft = _fixed_loss(p1, family)
    p2 = _fresh(pipes[family])
    load_loha_weights(p2, str(kohya))
    via_kohya = _fixed_loss(p2, family)
    assert via_kohya == pytest.approx(via_peft, rel=1e-6, abs=1e-7)
    assert abs(via_peft - base) > 1e-6  # the adapter learned something


def test_kohya_file_fp16_by_default_with_metadata(pipes, images, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    res = train_text_to_image(_cfg(pipes["sd1"], images, out, save_dtype="fp16", max_steps=1))
    with safe_open(res["kohya_file"], "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if "hada" in k}
    assert dtypes == {torch.float16}
    for key in ("ss_base_model_version", "ss_network_module", "ss_network_args", "ss_network_dim", "ss_network_alpha",
                "ss_resolution", "ss_steps", "ss_tag_frequency", "ss_num_train_images"):
        assert key in meta, key
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_resolution"] == "(32, 32)"


RESUME_CASES = {
    "sd1": dict(random_flip=True, shuffle_caption=True),
    "flux": dict(random_flip=True, shuffle_caption=True),
    "sd1-ema-te-accum": dict(ema_decay=0.7, train_text_encoder=True, grad_accum=2, lr_scheduler="cosine", caption_dropout=0.3),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_reproduces_the_uninterrupted_run(case, pipes, images, tmp_path):
    family, kw = case.split("-")[0], RESUME_CASES[case]
    full = tmp_path / "full"
    train_text_to_image(_cfg(pipes[family], images, full, max_steps=4, **kw))
    part = tmp_path / "part"
    with pytest.raises(TrainInterrupted) as e:
        train_text_to_image(_cfg(pipes[family], images, part, max_steps=4, **kw), should_stop=lambda step: step == 2)
    assert e.value.step == 2 and (part / "checkpoint-2" / "trainer_state.json").is_file()
    lines: list[str] = []
    train_text_to_image(_cfg(pipes[family], images, part, max_steps=4, resume=True, **kw), echo=lines.append)
    assert any("resumed from checkpoint-2" in x for x in lines)
    assert _losses(part) == _losses(full)
    assert _same_tensors(full / "loha.safetensors", part / "loha.safetensors")


def _same_tensors(a: Path, b: Path, rel: float = 0.0) -> bool:
    """Same keys; every tensor equal (``rel=0``) or within ``rel`` in relative Frobenius norm."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False
    if rel == 0:
        return all(torch.equal(x[k], y[k]) for k in x)
    return all(float((x[k] - y[k]).float().norm()) <= rel * float(y[k].float().norm()) + 1e-12 for k in x)


def test_cache_reused_and_invalidated(pipes, tmp_path):
    data = make_image_folder(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    r1 = train_text_to_image(_cfg(pipes["sd1"], data, tmp_path / "a", max_steps=1, cache_dir=str(cache)))
    assert r1["cache"]["latents"] == (0, 3) and r1["cache"]["text"] == (0, 3)
    lines: list[str] = []
    r2 = train_text_to_image(_cfg(pipes["sd1"], data, tmp_path / "b", max_steps=1, cache_dir=str(cache)), echo=lines.append)
    assert r2["cache"]["latents"] == (3, 0) and r2["cache"]["text"] == (3, 0)
    assert any("latents 3 reused, 0 computed" in x for x in lines)
    # a changed image invalidates its own entry only
    first = sorted(p for p in data.iterdir() if p.suffix != ".txt")[0]
    from PIL import Image

    Image.new("RGB", (40, 32), (1, 2, 3)).save(first)
    r3 = train_text_to_image(_cfg(pipes["sd1"], data, tmp_path / "c", max_steps=1, cache_dir=str(cache)))
    assert r3["cache"]["latents"] == (2, 1)
    # another model (other VAE / text encoder weights) invalidates everything
    other = make_pipeline_dir("sd1", tmp_path / "other", seed=5)
    r4 = train_text_to_image(_cfg(other, data, tmp_path / "d", max_steps=1, cache_dir=str(cache)))
    assert r4["cache"]["latents"] == (0, 3) and r4["cache"]["text"] == (0, 3)
    # shuffled captions are encoded per step, not cached: the cache holds the captions as written
    tags = make_image_folder(tmp_path / "tags", n=3)
    for i, txt in enumerate(sorted(tags.glob("*.txt"))):
        txt.write_text(f"tag{i}, red, small, thing, photo")
    entries = len(list((cache / "text").iterdir()))
    r_shuf = train_text_to_image(_cfg(pipes["sd1"], tags, tmp_path / "s", max_steps=4, cache_dir=str(cache), shuffle_caption=True,
                                      caption_dropout=0.2))
    assert r_shuf["cache"]["text"] == (0, 4)  # the 3 captions as written and ""
    assert len(list((cache / "text").iterdir())) == entries + 4
    # text outputs are not cached when the text encoder trains
    r5 = train_text_to_image(_cfg(pipes["sd1"], data, tmp_path / "e", max_steps=1, cache_dir=str(cache), train_text_encoder=True))
    assert r5["cache"]["text"] is None


def _cli(pipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "text-to-image", "--model", str(pipe), "--data", str(data), "--output-dir", str(out),
            "--resolution", "32", "--max-steps", "1", "-r", "2", "--cache-dir", str(out.parent / "cache"), "--no-progress", *extra]


def _bad_cases(tmp: Path, pipes: dict[str, Path], images: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    trunc = make_image_folder(tmp / "trunc", n=2)
    make_truncated_image(trunc / "broken.png")
    (trunc / "broken.txt").write_text("x")
    nocap = make_image_folder(tmp / "nocap", n=2)
    make_uncaptioned_image(nocap)
    unknown = tmp / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    missing = tmp / "missing"
    shutil.copytree(pipes["sd1"], missing)
    shutil.rmtree(missing / "vae")
    out = tmp / "out"
    huge = tmp / "huge"
    make_image_folder(huge / "99999999999_x", n=1)
    no_tok = tmp / "no_tok"
    shutil.copytree(pipes["sd1"], no_tok)
    for f in (no_tok / "tokenizer").iterdir():
        f.unlink()
    no_te2 = tmp / "no_te2"
    shutil.copytree(pipes["sdxl"], no_te2)
    shutil.rmtree(no_te2 / "text_encoder_2")
    idx = json.loads((no_te2 / "model_index.json").read_text())
    idx["text_encoder_2"] = [None, None]
    (no_te2 / "model_index.json").write_text(json.dumps(idx))
    cls_list = tmp / "cls_list"
    shutil.copytree(pipes["sd1"], cls_list)
    idx = json.loads((cls_list / "model_index.json").read_text())
    idx["_class_name"] = ["StableDiffusionPipeline"]
    (cls_list / "model_index.json").write_text(json.dumps(idx))
    bad_vae = tmp / "bad_vae"
    shutil.copytree(pipes["sd1"], bad_vae)
    vc = json.loads((bad_vae / "vae" / "config.json").read_text())
    vc["scaling_factor"] = "big"
    (bad_vae / "vae" / "config.json").write_text(json.dumps(vc))
    gif = make_image_folder(tmp / "gif", n=1)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(gif / "g.png", format="GIF")
    (gif / "g.txt").write_text("x")
    binary = tmp / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)))
    inside = make_image_folder(tmp / "inside", n=1)
    return {
        "empty folder": (_cli(pipes["sd1"], empty, out), "empty"),
        "truncated image": (_cli(pipes["sd1"], trunc, out), "broken.png"),
        "missing caption (error)": (_cli(pipes["sd1"], nocap, out, "--missing-caption", "error"), "nocaption.png"),
        "unknown family": (_cli(unknown, images, out), "KandinskyPipeline"),
        "missing component": (_cli(missing, images, out), "vae"),
        "resolution": (_cli(pipes["flux"], images, out, "--resolution", "30"), "--resolution 30"),
        "sample prompts": (_cli(pipes["sd1"], images, out, "--sample-prompts", str(tmp / "nope.txt")), "nope.txt"),
        "not a pipeline": (_cli(images, images, out), "model_index.json"),
        "text flag on image task": (_cli(pipes["sd1"], images, out, "--seq-len", "8"), "seq_len"),
        "UNet option on a DiT": (_cli(pipes["flux"], images, out, "--resolution", "32", "--min-snr-gamma", "5"), "--min-snr-gamma"),
        "guidance on SD3": (_cli(pipes["sd3"], images, out, "--guidance-scale", "3"), "--guidance-scale"),
        "SD3 position cap": (_cli(pipes["sd3"], images, out, "--resolution", "256"), "pos_embed_max_size"),
        "huge repeats": (_cli(pipes["sd1"], huge, out), "99999999999 repeats"),
        "huge resolution": (_cli(pipes["sd1"], images, out, "--resolution", "100000"), "'resolution'"),
        "T5 length": (_cli(pipes["flux"], images, out, "--max-sequence-length", "100000"), "'max_sequence_length'"),
        "empty tokenizer": (_cli(no_tok, images, out), "tokenizer/ holds no usable tokenizer"),
        "SDXL without text_encoder_2": (_cli(no_te2, images, out), "'text_encoder_2'"),
        "class name not a string": (_cli(cls_list, images, out), "pipeline class"),
        "VAE config": (_cli(bad_vae, images, out), "scaling_factor"),
        "fp16 on the CPU": (_cli(pipes["sd1"], images, out, "--mixed-precision", "fp16"), "fp16"),
        "GIF named .png": (_cli(pipes["sd1"], gif, out), "GIF"),
        "binary sample prompts": (_cli(pipes["sd1"], images, out, "--sample-prompts", str(binary)), "--sample-prompts"),
        "conv rank without convs": (_cli(pipes["sd1"], images, out, "--conv-r", "4"), "train_convs"),
        "image flag on text task": (["train", "--model", str(pipes["sd1"]), "--data", str(images), "--output-dir", str(out),
                                     "--resolution", "32"], "--resolution"),
    }


def test_bad_inputs_exit_2_and_write_nothing(pipes, images, tmp_path, capsys):
    inside = tmp_path / "inside"
    cases = _bad_cases(tmp_path, pipes, images)
    code = main(_cli(pipes["sd1"], inside, inside / "out"))
    assert code == 2 and "inside the image folder" in capsys.readouterr().err and not (inside / "out").exists()
    for name, (argv, needle) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / "out").exists(), name


@pytest.mark.parametrize("key,value", [("caption_ext", 5), ("cache_dir", 5), ("sample_prompts", 3), ("data", 1)])
def test_config_types_named(key, value, tmp_path):
    with pytest.raises(ValueError, match=f"'{key}'"):
        ImageTrainConfig.from_dict({"model": "m", "data": "d", "output_dir": "o", key: value})


def test_bad_image_skipped_and_missing_caption_modes(pipes, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n=2)
    make_truncated_image(data / "broken.png")
    make_uncaptioned_image(data)
    with pytest.warns(UserWarning) as got:
        assert main(_cli(pipes["sd1"], data, tmp_path / "o1", "--skip-bad-images", "--missing-caption", "warn")) == 0
    texts = [str(w.message) for w in got]
    assert any("skipped 1 unreadable image" in t and "broken.png" in t for t in texts)
    assert any("1 image" in t and "caption" in t for t in texts), texts  # one warning, with the count
    assert "3 images" in capsys.readouterr().out  # 2 + the uncaptioned one; the broken one skipped
    assert main(_cli(pipes["sd1"], data, tmp_path / "o2", "--skip-bad-images", "--missing-caption", "folder")) == 0
    from lohakit.formats.kohya import read_kohya_file

    freq = json.loads(read_kohya_file(str(tmp_path / "o2" / "loha.safetensors"))[1]["ss_tag_frequency"])
    assert freq["data"].get("data") == 1  # the uncaptioned image took its folder's name


def test_samples_text_encoder_convs_and_ema(pipes, images, tmp_path):
    from lohakit import LoHaModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing\n# comment\na blue thing\n")
    out = tmp_path / "out"
    res = train_text_to_image(_cfg(pipes["sd1"], images, out, sample_prompts=str(prompts), sample_every=1, sample_steps=2,
                                   train_text_encoder=True, train_convs=True, conv_r=3, ema_decay=0.5, save_every=1, max_steps=2))
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-000000.png", "step-000001.png", "step-000002.png"]
    from PIL import Image

    assert Image.open(out / "samples" / grids[-1]).size == (32, 64)  # one row per prompt
    assert set(res["adapters"]) == {"unet", "text_encoder"}
    from lohakit.formats.kohya import read_kohya_file

    names = read_kohya_file(res["kohya_file"])[0]
    assert any(k.startswith("lora_te_text_model_") for k in names) and any(k.startswith("lora_unet_") for k in names)
    cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert 3 in cfg["rank_pattern"].values() and any("conv1" in k for k in cfg["rank_pattern"])
    p = _fresh(pipes["sd1"])
    m = LoHaModel.from_pretrained(p.unet, str(out / "unet"))
    convs = [n for n, layer in m.loha_layers() if "conv1" in n]
    assert convs and all(dict(m.loha_layers())[n].r["default"] == 3 for n in convs)
    # EMA: the saved adapter is the EMA copy, not the live weights
    from safetensors.torch import load_file

    ck = out / "checkpoint-2"
    live, ema = load_file(str(ck / "params.safetensors")), load_file(str(ck / "ema.safetensors"))
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    saved = [t for n, t in m.named_parameters() if "hada_" in n]  # the final unet/ adapter, in training order
    assert len(saved) < len(ema)  # the text encoder's follow
    assert all(torch.equal(t.detach(), ema[str(i)]) for i, t in enumerate(saved))
    # the text encoder's adapter learned: its output moved away from the base's
    base_te = _fresh(pipes["sd1"]).text_encoder
    te = LoHaModel.from_pretrained(_fresh(pipes["sd1"]).text_encoder, str(out / "text_encoder"))
    ids = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        assert not torch.allclose(te(ids)[0], base_te(ids)[0])


def test_bf16_checkpointing_accumulation_cosine(pipes, images, tmp_path):
    from lohakit import LoHaModel

    res = train_text_to_image(_cfg(pipes["sdxl"], images, tmp_path / "out", mixed_precision="bf16", gradient_checkpointing=True,
                                   grad_accum=2, lr_scheduler="cosine", warmup_steps=1, max_steps=2))
    losses = _losses(tmp_path / "out")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())]
    assert lrs[0] > lrs[1]  # cosine decay after the warm-up step
    m = LoHaModel.from_pretrained(_fresh(pipes["sdxl"]).unet, res["adapters"]["unet"])
    assert {t.dtype for n, t in m.named_parameters() if "hada_" in n} == {torch.float32}  # the adapter trained in float32


def test_config_file_and_kohya_repeat_folders(pipes, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n=4, layout="kohya")
    conf = tmp_path / "train.yaml"
    conf.write_text(f"task: text-to-image\nmodel: {pipes['sd1']}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n"
                    f"resolution: 32\nmax_steps: 1\nprogress: false\ncache_dir: {tmp_path / 'cache'}\n"
                    "loha:\n  r: 2\n  target_modules: [to_q, to_v]\n")
    assert main(["train", str(conf)]) == 0
    printed = capsys.readouterr().out
    assert "4 images (8 samples with repeats)" in printed and "done: step 1" in printed
    conf = json.loads((tmp_path / "out" / "unet" / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == ["to_q", "to_v"] and conf["r"] == 2
    from lohakit.formats.kohya import read_kohya_file

    _, m, _ = read_kohya_file(str(tmp_path / "out" / "loha.safetensors"))
    assert set(json.loads(m["ss_tag_frequency"])) == {"3_redthing", "1_bluething"}


def test_ctrl_c_saves_a_checkpoint(pipes, images, tmp_path):
    from helpers.processes import last_checkpoint_state, lohakit_ctrl_c_after

    out = tmp_path / "out"
    code, err = lohakit_ctrl_c_after(_cli(pipes["sd1"], images, out, "--max-steps", "100000", "--save-every", "0"), out, steps=2)
    assert code == 130, err
    state = last_checkpoint_state(out)
    assert state is not None and state["reason"] == "interrupted" and state["step"] >= 2, err
    ck = state["_dir"]
    assert (ck / "loha.safetensors").is_file() and (ck / "unet" / "adapter_config.json").is_file()
    assert "checkpoint saved" in err.strip().splitlines()[-1]


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.mark.slow
def test_two_processes_match_one(pipes, images, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_DISABLE_RICH="1")
    env.pop("WORLD_SIZE", None)
    two = tmp_path / "two"
    args = _cli(pipes["sd1"], images, two, "--max-steps", "3", "--batch-size", "1", "--lr", "1e-2", "--save-every", "2",
                "--save-dtype", "fp32", "--grad-accum", "2")
    cmd = [*_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lohakit", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and st["replica_digests"][0] == st["replica_digests"][1]
    assert r.stdout.count("done:") == 1
    one = tmp_path / "one"
    assert main(_cli(pipes["sd1"], images, one, "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--save-every", "2",
                     "--save-dtype", "fp32", "--grad-accum", "2")) == 0
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert _same_tensors(two / "loha.safetensors", one / "loha.safetensors", rel=1e-3)  # gradients summed in another order; Adam scales tiny gradients up (measured 2e-4 at most)
