"""PhotoGuard's encoder attack."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import PGDAttack
from .models.autoencoder import as_autoencoder
from .registry import register


@register
class EncoderAttack(PGDAttack):
    """Encoder attack of PhotoGuard ("Raising the Cost of Malicious AI-Powered Image Editing", Salman et al.,
    ICML 2023, https://arxiv.org/abs/2302.06588), as run in the FaceLock code.

    Threat model: L-infinity, `eps` in `[-1, 1]` units (0.03 is about 3.8/255 of the pixel range).
    Targeted (default): push the latent `E(x')` toward the zero latent by descending `||E(x')||_2`.
    Untargeted: push it away from the clean latent by ascending `MSE(E(x'), E(x))`.
    Defaults: eps 0.03, step_size 0.01, num_iters 100 (the FaceLock code's); the other options of `PGDAttack`.

    Example::

        attack = EncoderAttack(pipe.vae, eps=0.03, targeted=True)
        protected = attack(images, generator=torch.Generator().manual_seed(0))   # images in [-1, 1]
    """

    name = "encoder"
    summary = "PhotoGuard encoder attack: move the VAE latent to zero (targeted) or away from the clean one"
    models = ("autoencoder",)

    def __init__(self, autoencoder: nn.Module, targeted: bool = True, **options) -> None:
        super().__init__(**options)
        self.autoencoder = as_autoencoder(autoencoder)
        self.targeted = targeted

    def prepare(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.targeted else self.autoencoder.encode(x).float()

    def objective(self, x_adv: torch.Tensor, clean_latent: torch.Tensor | None, i: int) -> torch.Tensor:
        latent = self.autoencoder.encode(x_adv).float()
        if self.targeted:
            return -latent.flatten(1).norm(dim=1)
        return F.mse_loss(latent, clean_latent, reduction="none").flatten(1).mean(dim=1)
