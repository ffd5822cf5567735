"""The text-to-image objectives against diffusers' own definitions, per family.

The denoiser is wrapped to capture what the objective feeds it; from the captured noisy input
and timestep the test recovers the noise the objective drew and rebuilds the target from the
formulas (DDPM: x_t = √ᾱ x₀ + √(1−ᾱ) ε; flow: x_σ = (1−σ) x₀ + σ ε, target ε − x₀), then checks
the loss. The σ shift is checked against diffusers' scheduler tables (static SD3 shift,
FLUX.1-dev's dynamic one through the pipeline's ``calculate_shift``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.pipelines import make_pipeline
from lohakit.app.objectives import objective_for

FAMILY = {"sd1": "sd", "sd2v": "sd", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Capture(torch.nn.Module):
    """Calls the real denoiser and keeps its inputs and output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls.append((args, kwargs, out[0]))
        return out


def _setup(name: str, **options):
    pipe = make_pipeline(name)
    obj = objective_for(pipe, FAMILY[name], **options)
    c = obj.denoiser.config.in_channels // (4 if name == "flux" else 1)
    x0 = torch.randn(3, c, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = obj.encode_prompts(["a red thing", "a blue thing", ""], "cpu")
    return pipe, obj, x0, cond


@pytest.mark.parametrize("name", ["sd1", "sd2v", "sdxl"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_ddpm_targets_and_min_snr(name, gamma):
    pipe, obj, x0, cond = _setup(name, min_snr_gamma=gamma)
    cap = Capture(obj.denoiser)
    time_ids = torch.tensor([[40, 32, 4, 0, 32, 32], [16, 16, 0, 0, 16, 16], [64, 48, 0, 8, 48, 48]], dtype=torch.float32)
    with torch.no_grad():
        loss = obj.loss(cap, x0, cond, [7, 8, 9], time_ids=time_ids)
    (noisy, t), kwargs, pred = cap.calls[0]
    ac = obj.train_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (noisy - ac.sqrt() * x0) / (1 - ac).sqrt()  # the noise the objective drew
    kind = pipe.scheduler.config.prediction_type
    assert obj.kind == kind == ("v_prediction" if name == "sd2v" else "epsilon")
    target = ac.sqrt() * eps - (1 - ac).sqrt() * x0 if kind == "v_prediction" else eps
    want = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if gamma:
        snr = (ac / (1 - ac)).view(-1)
        want = want * torch.clamp(snr, max=gamma) / (snr + 1 if kind == "v_prediction" else snr)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert ((t >= 0) & (t < 1000)).all() and t.dtype == torch.long
    if name == "sdxl":
        torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], time_ids)
        assert kwargs["added_cond_kwargs"]["text_embeds"].shape[0] == 3


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_flow_matching_target_and_inputs(name):
    pipe, obj, x0, cond = _setup(name)
    cap = Capture(obj.denoiser)
    with torch.no_grad():
        loss = obj.loss(cap, x0, cond, [7, 8, 9])
    _, kw, pred = cap.calls[0]
    b, c, h, w = x0.shape
    if name == "flux":
        sigma = kw["timestep"]  # FLUX takes σ itself (the transformer scales by 1000)
        torch.testing.assert_close(kw["guidance"], torch.full((b,), 3.5))
        assert kw["hidden_states"].shape == (b, (h // 2) * (w // 2), 4 * c)
        assert kw["img_ids"].shape == ((h // 2) * (w // 2), 3) and kw["txt_ids"].shape[1] == 3
        packed_x0 = pipe._pack_latents(x0, b, c, h, w)
        s = sigma.view(-1, 1, 1)
        eps = (kw["hidden_states"] - (1 - s) * packed_x0) / s
        target = eps - packed_x0
        want = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2))
    else:
        sigma = kw["timestep"] / 1000  # SD3 takes 1000·σ
        s = sigma.view(-1, 1, 1, 1)
        eps = (kw["hidden_states"] - (1 - s) * x0) / s
        want = F.mse_loss(pred, eps - x0, reduction="none").mean(dim=(1, 2, 3))
        assert "guidance" not in kw
    assert ((sigma > 0) & (sigma < 1)).all()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)


def test_sigma_shift_matches_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = torch.linspace(1.0, 1 / 1000, 1000)
    _, sd3, _, _ = _setup("sd3")
    ref = FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config)  # static shift 3.0
    torch.testing.assert_close(sd3.shift(u, 16), ref.sigmas.float(), rtol=1e-5, atol=1e-6)  # the training table
    _, flux, _, _ = _setup("flux")
    cfg = flux.pipe.scheduler.config
    assert cfg.use_dynamic_shifting
    for seq_len in (256, 1024, 4096):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        sched.set_timesteps(sigmas=u.numpy(), mu=mu)
        torch.testing.assert_close(flux.shift(u, seq_len), sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)


def test_draws_depend_on_the_seed_only():
    _, obj, x0, cond = _setup("sd1")
    with torch.no_grad():
        a = obj.loss(obj.denoiser, x0, cond, [1, 2, 3])
        b = obj.loss(obj.denoiser, x0[[1, 2]], {k: v[[1, 2]] for k, v in cond.items()}, [2, 3])
        c = obj.loss(obj.denoiser, x0, cond, [1, 2, 4])
    torch.testing.assert_close(a[1:], b)  # a sample's loss does not depend on its batch
    assert not torch.allclose(a[2], c[2])
