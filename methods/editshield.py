"""EditShield: shift InstructPix2Pix's latents of the photo away from the clean ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import PGDAttack
from .models.autoencoder import as_autoencoder
from .randomness import Generators, normal_noise, per_sample_generators
from .registry import register

#: The noise schedule InstructPix2Pix (and Stable Diffusion 1.x) was trained with: its UNet's noisy inputs.
TRAINING_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class _Clean:
    image: torch.Tensor
    latent: torch.Tensor


def random_timesteps(n: int, count: int, generator: Generators) -> torch.Tensor:
    """One training timestep in `0..count-1` per sample, each drawn from that sample's generator (on the CPU)."""
    draws = [torch.randint(count, (1,), generator=g, device=g.device if g is not None else "cpu")
             for g in per_sample_generators(generator, n)]
    return torch.cat([d.cpu() for d in draws])


@register
class EditShield(PGDAttack):
    """EditShield ("EditShield: Protecting Unauthorized Image Editing by Instruction-guided Diffusion Models",
    Chen et al., ECCV 2024, https://arxiv.org/abs/2311.12066; official code Allen-piexl/Editshield).

    Ascends, per image, with `z = E(x')` the autoencoder's latent (posterior mean) and `z0 = E(x)`:

        MSE([noisy(s * z, t, n), z], [noisy(s * z0, t, n), z0]) - fidelity_weight * MSE((x' - x) / 2)

    where `noisy(., t, n)` is the DDPM forward process at a random training timestep `t` with noise `n` (the UNet's
    noisy input; `s` the autoencoder's scaling factor) and `z` unscaled is InstructPix2Pix's image-conditioning
    latent; both latents of the protected photo move away from the clean photo's, while the last term (pixels in
    `[0, 1]` units, as the official code) keeps it close to the photo. `t` and `n` are drawn afresh at every step
    from each image's generator and applied to both sides, so the distance measures the latents and not the noise.
    The clean latent is computed once.

    Its robustness to rotation, blur and cropping comes from the engine's expectation over transformation
    (`eot=eot_transform(["rotate", "blur", "crop"])`); each transformed sample is compared with the clean photo
    under the same transform (`paired_transforms`), fidelity term included.

    Threat model: L-infinity, `eps` in `[-1, 1]` units, projected every step (or L2 with `norm="l2"`). Defaults:
    eps 0.03, step_size 0.01, num_iters 100, fidelity_weight 0.1; the other options of `PGDAttack`.

    Models:
        autoencoder: the editor's autoencoder (`AutoencoderKL`; `AutoencoderTiny` works too, with its own scaling
            factor of 1).
        noise_scheduler: supplies `add_noise` and `config.num_train_timesteps` (default: a `DDPMScheduler` with
            InstructPix2Pix's training schedule).

    Example::

        attack = EditShield(pipe.vae, eot=eot_transform(["rotate", "blur", "crop"]), eot_samples=2)
        protected = attack(images, generator=[torch.Generator().manual_seed(s) for s in seeds])
    """

    name = "editshield"
    summary = "EditShield: move InstructPix2Pix's noisy and image-conditioning latents away from the clean ones"
    models = ("autoencoder",)
    paired_transforms = True

    def __init__(self, autoencoder: nn.Module, fidelity_weight: float = 0.1, noise_scheduler=None, **options) -> None:
        super().__init__(**options)
        self.autoencoder = as_autoencoder(autoencoder)
        self.fidelity_weight = fidelity_weight
        if noise_scheduler is None:
            from diffusers import DDPMScheduler

            noise_scheduler = DDPMScheduler(**TRAINING_SCHEDULE)
        self.noise_scheduler = noise_scheduler
        self.scaling_factor = getattr(self.autoencoder.vae.config, "scaling_factor", 1.0)
        self.generators: Generators = None  # the per-image generators of the call in progress

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        self.generators = generator
        try:
            return super().perturb(x, generator)
        finally:
            self.generators = None

    def prepare(self, x: torch.Tensor) -> _Clean:
        return _Clean(x, self.autoencoder.encode(x).float())

    def objective(self, x_adv: torch.Tensor, clean: _Clean, i: int) -> torch.Tensor:
        """Timesteps and noise come from the generators of the call in progress (outside a call, from torch's
        global generator)."""
        latent = self.autoencoder.encode(x_adv).float()
        timesteps = random_timesteps(len(latent), self.noise_scheduler.config.num_train_timesteps, self.generators)
        noise = normal_noise(latent, self.generators)
        noisy, noisy_clean = (self.noise_scheduler.add_noise(self.scaling_factor * z, noise, timesteps.to(z.device))
                              for z in (latent, clean.latent))
        shift = F.mse_loss(torch.cat([noisy, latent], dim=1), torch.cat([noisy_clean, clean.latent], dim=1),
                           reduction="none").flatten(1).mean(dim=1)
        fidelity = ((x_adv - clean.image) / 2).square().flatten(1).mean(dim=1)
        return shift - self.fidelity_weight * fidelity
