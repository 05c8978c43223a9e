"""Uniform random noise in the budget: the control every protection should beat."""

from __future__ import annotations

import torch

from .base import Attack
from .randomness import Generators, uniform_noise
from .registry import register


@register
class UniformNoise(Attack):
    """Adds uniform random noise in `[-eps, eps]` to every pixel. It protects nothing on purpose: it tells how much
    of a method's effect a perturbation of the same size brings without any optimisation.

    Threat model: L-infinity, `eps` in `[-1, 1]` units (default 0.03). No models, no iterations.

    Example::

        control = UniformNoise(eps=0.03)(images, generator=torch.Generator().manual_seed(0))
    """

    name = "noise"
    summary = "control: uniform random noise within the budget (protects nothing; for comparison)"

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        return x + uniform_noise(x, -self.eps, self.eps, generator)
