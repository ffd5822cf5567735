"""Training objectives of text-to-image pipelines: one per family, chosen from the pipeline.

* **UNets** (SD 1.x/2.x, SDXL): DDPM noise prediction. The scheduler config's
  ``prediction_type`` says the target: ``epsilon`` (the noise ε), ``v_prediction``
  (v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀) or ``sample`` (x₀). Timesteps uniform in ``[0, T)``; optional
  Min-SNR-γ weighting ``min(SNR, γ)/SNR`` (ε) or ``min(SNR, γ)/(SNR + 1)`` (v), and an offset
  noise ``ε + offset·n`` with ``n ~ N(0, 1)`` per (sample, channel).
* **Flow matching** (FLUX.1, SD3/3.5): ``x_σ = (1 − σ)·x₀ + σ·ε``, target the velocity
  ``ε − x₀``. σ is drawn as ``sigmoid(N(0, 1))`` (``logit_normal``, the SD3 paper's choice) or
  uniformly, then shifted as the pipeline's scheduler config says: a fixed ``shift`` s maps
  σ → s·σ / (1 + (s − 1)·σ) (SD3: 3.0); with ``use_dynamic_shifting`` (FLUX.1-dev) the shift is
  ``exp(μ)/(exp(μ) + 1/σ − 1)`` with μ linear in the packed image's sequence length between
  (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``). FLUX takes
  σ itself as its timestep (the transformer multiplies by 1000), its 2×2-packed latents and, for
  guidance-distilled models, the guidance scale as an input; SD3 takes ``1000·σ``.

Latents are the VAE's ``(z − shift_factor)·scaling_factor`` (no shift for the UNets' VAEs). Every
random draw of a sample comes from its own seed, so a batch's loss does not depend on how the
batch is split over processes.

Shapes: pixels ``(B, 3, H, W)`` in [-1, 1]; latents ``(B, C, H/f, W/f)`` with f the VAE's scale
factor; prompt embeddings ``(B, L, D)``, pooled ``(B, D')``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Objective", "objective_for", "FAMILY_DEFAULT_TARGETS", "TIMESTEP_SAMPLING"]

TIMESTEP_SAMPLING = ("logit_normal", "uniform")

#: What the community trains per family (attention + MLP projections; kohya's / ai-toolkit's defaults).
FAMILY_DEFAULT_TARGETS: dict[str, list[str]] = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "flux": [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    ],
    "sd3": [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ],
}
#: The UNets' ResNet convolutions (trained with ``conv_r`` / ``conv_alpha`` when asked).
UNET_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
#: The text encoders' projections (CLIP and T5 names).
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"]


def _gen(seed: int, salt: int) -> torch.Generator:
    """The generator of one sample's draws of one kind (``salt``: noise, timestep, posterior...)."""
    return torch.Generator().manual_seed((seed * 7919 + salt) % (2**63 - 1))


def _per_sample(seeds: Sequence[int], shape: Sequence[int], salt: int) -> torch.Tensor:
    """``(B, *shape)`` standard normal draws, sample b from seed ``seeds[b]``."""
    return torch.stack([torch.randn(tuple(shape), generator=_gen(s, salt)) for s in seeds])


@dataclass
class Objective:
    """A pipeline's training objective (see the module docstring).

    Attributes:
        family: ``sd``, ``sdxl``, ``flux`` or ``sd3``.
        pipe: The diffusers pipeline (its VAE, text encoders, tokenizers and scheduler are used).
        kind: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        factor: Side multiple of an image: VAE factor × patch (FLUX packs 2×2, SD3 patchifies).
    """

    family: str
    pipe: Any
    kind: str
    factor: int
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str = "logit_normal"
    guidance_scale: float | None = None
    max_sequence_length: int | None = None

    # ------------------------------------------------------------------ conditioning
    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet if self.family in ("sd", "sdxl") else self.pipe.transformer

    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std, both ``(B, C, h, w)``, in the VAE's own scale."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, mean: torch.Tensor, std: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)``: one posterior draw per sample, shifted and scaled."""
        cfg = self.pipe.vae.config
        eps = _per_sample(seeds, mean.shape[1:], salt=1).to(mean.device)
        z = mean + std * eps
        shift = getattr(cfg, "shift_factor", None) if self.kind == "flow" else None
        return (z - (shift or 0.0)) * cfg.scaling_factor

    def encode_prompts(self, captions: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Prompt embeddings, batch first: ``{"encoder_hidden_states": (B, L, D)[, "pooled": (B, D')]}``."""
        p, captions = self.pipe, list(captions)
        if self.family == "sd":
            emb = p.encode_prompt(captions, device, 1, False)[0]
            return {"encoder_hidden_states": emb}
        if self.family == "sdxl":
            emb, _, pooled, _ = p.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb, "pooled": pooled}
        kw = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        if self.family == "flux":
            emb, pooled, _ = p.encode_prompt(captions, None, device=device, **kw)
            return {"encoder_hidden_states": emb, "pooled": pooled}
        emb, _, pooled, _ = p.encode_prompt(captions, None, None, device=device, do_classifier_free_guidance=False, **kw)
        return {"encoder_hidden_states": emb, "pooled": pooled}

    # ------------------------------------------------------------------ loss
    def loss(
        self, denoiser: nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor], seeds: Sequence[int],
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss ``(B,)`` of ``denoiser`` on ``latents`` with the draws of ``seeds``.

        ``time_ids`` (SDXL): ``(B, 6)`` = original (h, w), crop (top, left), target (h, w) in
        pixels; default: the latents' own size, uncropped.
        """
        if self.kind == "flow":
            return self._flow_loss(denoiser, latents, cond, seeds)
        return self._ddpm_loss(denoiser, latents, cond, seeds, time_ids)

    @functools.cached_property
    def train_scheduler(self) -> Any:
        """A DDPM scheduler from the pipeline's config: the training noise (SDXL ships Euler for sampling)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def _ddpm_loss(
        self, unet: nn.Module, x0: torch.Tensor, cond: dict[str, torch.Tensor], seeds: Sequence[int], time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        sched = self.train_scheduler
        dev, b = x0.device, x0.shape[0]
        n_t = int(sched.config.num_train_timesteps)
        noise = _per_sample(seeds, x0.shape[1:], salt=2).to(dev, x0.dtype)  # (B, C, h, w)
        if self.noise_offset:
            noise = noise + self.noise_offset * _per_sample(seeds, (x0.shape[1], 1, 1), salt=3).to(dev, x0.dtype)
        u = torch.stack([torch.rand((), generator=_gen(s, 4)) for s in seeds])
        t = (u * n_t).long().clamp_(max=n_t - 1).to(dev)  # (B,)
        noisy = sched.add_noise(x0, noise, t)
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if self.family == "sdxl":
            if time_ids is None:
                h, w = x0.shape[-2] * self.factor, x0.shape[-1] * self.factor
                time_ids = torch.tensor([[h, w, 0, 0, h, w]]).expand(b, 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(dev, x0.dtype)}
        pred = unet(noisy, t, return_dict=False, **kwargs)[0]
        if self.kind == "epsilon":
            target = noise
        elif self.kind == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            target = x0
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma:
            # Min-SNR-γ (Hang et al. 2023): min(SNR, γ) on the x₀ loss, i.e. /SNR for ε, /(SNR + 1) for v
            ac = sched.alphas_cumprod.to(dev)[t].float()
            snr = (ac / (1 - ac).clamp_min(1e-12)).clamp_min(1e-12)
            w = torch.clamp(snr, max=self.min_snr_gamma)
            loss = loss * {"epsilon": w / snr, "v_prediction": w / (snr + 1), "sample": w}[self.kind]
        return loss

    def sigmas(self, seeds: Sequence[int], image_seq_len: int) -> torch.Tensor:
        """σ per sample ``(B,)``: drawn (``timestep_sampling``), then shifted as the scheduler says."""
        draws = []
        for s in seeds:
            g = _gen(s, 5)
            draws.append(torch.sigmoid(torch.randn((), generator=g)) if self.timestep_sampling == "logit_normal" else torch.rand((), generator=g))
        return self.shift(torch.stack(draws).clamp(1e-5, 1 - 1e-5), image_seq_len)

    def shift(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """σ from an unshifted draw ``u`` in (0, 1), as the scheduler config shifts its sigmas."""
        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
            b_s, m_s = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
            mu = b_s + (m_s - b_s) * (image_seq_len - lo) / max(hi - lo, 1)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        shift = float(cfg.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def _flow_loss(self, model: nn.Module, x0: torch.Tensor, cond: dict[str, torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        dev, (b, c, h, w) = x0.device, x0.shape
        noise = _per_sample(seeds, x0.shape[1:], salt=2).to(dev, x0.dtype)
        seq_len = (h // 2) * (w // 2) if self.family == "flux" else (h // self._patch()) * (w // self._patch())
        sigma = self.sigmas(seeds, seq_len).to(dev, x0.dtype)  # (B,)
        s4 = sigma.view(b, 1, 1, 1)
        noisy = (1 - s4) * x0 + s4 * noise
        target = noise - x0
        if self.family == "flux":
            pack = self.pipe._pack_latents
            packed = pack(noisy, b, c, h, w)  # (B, hw/4, 4C)
            target = pack(target, b, c, h, w)
            emb = cond["encoder_hidden_states"]
            kwargs: dict[str, Any] = {}
            if getattr(model.config, "guidance_embeds", False):
                g = 3.5 if self.guidance_scale is None else self.guidance_scale  # FLUX.1-dev's default
                kwargs["guidance"] = torch.full((b,), g, device=dev, dtype=x0.dtype)
            pred = model(
                hidden_states=packed, timestep=sigma, pooled_projections=cond["pooled"], encoder_hidden_states=emb,
                txt_ids=torch.zeros(emb.shape[1], 3, device=dev, dtype=x0.dtype),
                img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, x0.dtype), return_dict=False, **kwargs,
            )[0]
            return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
        pred = model(
            hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def _patch(self) -> int:
        return int(getattr(self.pipe.transformer.config, "patch_size", 1))


def objective_for(pipe: Any, family: str, **options: Any) -> Objective:
    """The objective of ``pipe`` (a diffusers pipeline of ``family``), from its scheduler config.

    Args:
        pipe: The pipeline.
        family: ``sd``, ``sdxl``, ``flux`` or ``sd3`` (see :mod:`lohakit.formats.families`).
        **options: ``min_snr_gamma``, ``noise_offset`` (UNets), ``timestep_sampling``,
            ``guidance_scale``, ``max_sequence_length`` (DiTs).

    Raises:
        ValueError: a scheduler whose ``prediction_type`` is not one of the three.
    """
    f = int(pipe.vae_scale_factor)  # every one of these pipelines derives it from its VAE
    if family in ("sd", "sdxl"):
        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {kind!r} is not epsilon, v_prediction or sample")
        return Objective(family, pipe, kind, f, **options)
    patch = 2 if family == "flux" else int(getattr(pipe.transformer.config, "patch_size", 1))
    return Objective(family, pipe, "flow", f * patch, **options)

