"""Carlini-Wagner L2 attack on the autoencoder's encoder."""

from __future__ import annotations

import torch
from torch import nn

from .base import Attack, project
from .models.autoencoder import as_autoencoder
from .randomness import Generators, uniform_noise
from .registry import register

# Pixels at exactly -1 or 1 have no finite tanh pre-image; they start this close to the bound instead.
_TANH_MARGIN = 1e-6


@register
class CWL2Attack(Attack):
    """CW-L2 ("Towards Evaluating the Robustness of Neural Networks", Carlini and Wagner, S&P 2017,
    https://arxiv.org/abs/1608.04644) against the encoder, the `cw` baseline of the FaceLock code.

    Minimises, with Adam in tanh space, `||x' - x||^2 + c * f(x')` per image, where the squared distance is
    measured in `[0, 1]` pixel units (as in the FaceLock code, so `c` keeps its meaning) and
    `f(x') = -||E(x') - E(x)||_2` (untargeted, default) or `||E(x')||_2` (targeted, toward the zero latent).
    The result is then clipped to the L-infinity budget `eps` and the `[-1, 1]` bounds like every other method.

    Differences from the FaceLock code, on purpose: the optimisation starts at the image plus the uniform random
    start of the PGD methods (the code starts from a uniform grey image, `w = 0`; starting at the image exactly
    would leave the untargeted gradient undefined, as `||E(x') - E(x)||` has none at `x' = x`); the encoder sees
    images in `[-1, 1]` (the code feeds it `[0, 1]`); the latent distance is the L2 norm over the whole latent of
    each image (the code sums norms over the last axis only); and the budget is the same `eps` in `[-1, 1]` units
    as the other methods (the code clips to `eps` in `[0, 1]` units, twice as large).

    Defaults: c 0.03, lr 0.03, num_iters 100.

    Example::

        protected = CWL2Attack(pipe.vae, c=0.03, lr=0.03)(images)
    """

    name = "cw"
    summary = "Carlini-Wagner L2 on the VAE encoder (Adam in tanh space), then clipped to the budget"
    models = ("autoencoder",)

    def __init__(self, autoencoder: nn.Module, eps: float = 0.03, c: float = 0.03, lr: float = 0.03,
                 num_iters: int = 100, targeted: bool = False, progress: bool = False) -> None:
        super().__init__(eps=eps, progress=progress)
        if c < 0 or lr <= 0 or num_iters < 1:
            raise ValueError(f"need c >= 0, lr > 0 and num_iters >= 1, got {c}, {lr} and {num_iters}")
        self.autoencoder = as_autoencoder(autoencoder)
        self.c, self.lr, self.num_iters, self.targeted = c, lr, num_iters, targeted

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.autoencoder.encode(x).float()

    def objective(self, x_adv: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        """Minus the CW cost, per image."""
        x, clean_latent = reference
        distance = ((x_adv - x) / 2).square().flatten(1).sum(dim=1)
        latent = self.autoencoder.encode(x_adv).float()
        if self.targeted:
            f = latent.flatten(1).norm(dim=1)
        else:
            f = -(latent - clean_latent).flatten(1).norm(dim=1)
        return -(distance + self.c * f)

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        with torch.no_grad():
            reference = self.prepare(x)
        start = project(x + uniform_noise(x, -self.eps, self.eps, generator), x, self.eps, self.bounds)
        w = torch.atanh(start.clamp(-1 + _TANH_MARGIN, 1 - _TANH_MARGIN)).requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.lr)
        bar = self.iterations(self.num_iters, desc=self.name)
        for i in bar:
            cost = -self.objective(torch.tanh(w), reference, i)
            optimizer.zero_grad(set_to_none=True)
            cost.sum().backward()
            optimizer.step()
            bar.set_postfix(cost=f"{cost.mean().item():.4f}", refresh=False)
        return torch.tanh(w.detach())
