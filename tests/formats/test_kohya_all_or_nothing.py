"""kohya loads are all-or-nothing: an exception (Ctrl-C included) while applying a file leaves the
models bit-identical, and a merge that would write NaN/inf into a weight is refused before any
weight changes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.kohya_reference import lycoris_kohya_file
from helpers.models import clip_te, sd1_unet
from helpers.snapshots import assert_unchanged, snapshot
from lohakit import LoHaLayer, LoHaModel
from lohakit.core.io import NonFiniteTensorError
from lohakit.formats.kohya import load_kohya


@pytest.fixture(scope="module")
def file_and_models(tmp_path_factory):
    unet, te = sd1_unet(), clip_te()
    path = str(tmp_path_factory.mktemp("kohya") / "loha.safetensors")
    lycoris_kohya_file(path, copy.deepcopy(te), copy.deepcopy(unet), tucker=False)
    return path, unet, te


@pytest.mark.parametrize("fail_at", [1, 5, -1], ids=["first", "fifth", "register"])
def test_interrupt_while_applying_live_leaves_models_unchanged(file_and_models, monkeypatch, fail_at) -> None:
    path, unet0, te0 = file_and_models
    unet, te = copy.deepcopy(unet0), copy.deepcopy(te0)
    before = {"unet": snapshot(unet), "te": snapshot(te)}
    calls = [0]
    real = LoHaLayer.update_layer

    def flaky(self, *a, **k):
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(LoHaLayer, "update_layer", flaky)
    if fail_at == -1:  # after every layer is in: the bookkeeping step fails
        import lohakit.formats.kohya as kohya

        def broken(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(kohya, "_register_in_loha_models", broken)
    with pytest.raises(KeyboardInterrupt):
        load_kohya(path, {"lora_unet": unet, "lora_te": te})
    assert_unchanged(unet, before["unet"])
    assert_unchanged(te, before["te"])
    assert not any(isinstance(m, LoHaLayer) for m in [*unet.modules(), *te.modules()])
    monkeypatch.undo()
    report = load_kohya(path, {"lora_unet": unet, "lora_te": te})  # and the same models still load it
    assert report.matched


def test_interrupt_on_a_loha_model_restores_its_bookkeeping(file_and_models, monkeypatch) -> None:
    path, unet0, _ = file_and_models
    from lohakit import LoHaConfig

    model = LoHaModel(copy.deepcopy(unet0), LoHaConfig(r=2, target_modules=["to_q"]))
    before = snapshot(model)
    monkeypatch.setattr("lohakit.formats.kohya._register_in_loha_models",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="match no module"):
        load_kohya(path, {"lora_unet": model}, adapter_name="style", strict=False)  # (the file's te modules)
    assert_unchanged(model, before)


def test_merge_that_would_write_inf_is_refused_and_changes_nothing(file_and_models, tmp_path) -> None:
    path, unet0, te0 = file_and_models
    sd = load_file(path)
    huge = {k: (v * 1e20 if k.endswith(("hada_w1_a", "hada_w2_a")) else v) for k, v in sd.items()}
    bad = str(tmp_path / "huge.safetensors")
    save_file(huge, bad)
    unet, te = copy.deepcopy(unet0), copy.deepcopy(te0)
    before = {"unet": snapshot(unet), "te": snapshot(te)}
    with pytest.raises(NonFiniteTensorError, match="NaN or inf"):
        load_kohya(bad, {"lora_unet": unet, "lora_te": te}, merge=True)
    assert_unchanged(unet, before["unet"])
    assert_unchanged(te, before["te"])
    report = load_kohya(path, {"lora_unet": unet, "lora_te": te}, merge=True)  # a sane file still merges
    assert report.merged and report.matched
    assert any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), unet0.state_dict().values()))
