"""The whole-autoencoder attack of the FaceLock code's baselines."""

from __future__ import annotations

import torch
from torch import nn

from .base import PGDAttack
from .models.autoencoder import as_autoencoder
from .registry import register


@register
class VAEAttack(PGDAttack):
    """Autoencoder attack: drive the reconstruction `D(E(x'))` toward a black image by descending its L2 norm
    (the `vae` baseline of "Edit Away and My Face Will not Stay", Wang et al., CVPR 2025,
    https://arxiv.org/abs/2411.16832, after PhotoGuard https://arxiv.org/abs/2302.06588).

    Threat model: L-infinity, `eps` in `[-1, 1]` units. Defaults: eps 0.03, step_size 0.01, num_iters 100; the other
    options of `PGDAttack`.

    Example::

        protected = VAEAttack(pipe.vae)(images, generator=torch.Generator().manual_seed(0))
    """

    name = "vae"
    summary = "autoencoder attack: drive the VAE reconstruction D(E(x)) toward zero"
    models = ("autoencoder",)

    def __init__(self, autoencoder: nn.Module, **options) -> None:
        super().__init__(**options)
        self.autoencoder = as_autoencoder(autoencoder)

    def objective(self, x_adv: torch.Tensor, reference: None, i: int) -> torch.Tensor:
        return -self.autoencoder(x_adv).float().flatten(1).norm(dim=1)
