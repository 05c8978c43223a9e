"""Random draws with explicit generators, one stream per sample, so that a batch sees what single runs see (the habit
of diffusers' `randn_tensor`): the engine's random start, the transforms' parameters, the methods' noise."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample_generators(generator: Generators, n: int) -> list[torch.Generator | None]:
    """One generator per sample: a list is taken as it is (its length checked), anything else repeated."""
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for a batch of {n}")
    return generators


def uniform_noise(like: torch.Tensor, low: float, high: float, generator: Generators = None) -> torch.Tensor:
    """Uniform noise shaped like `like`, drawn on each generator's own device and then moved to `like`'s.

    A list of generators gives each sample its own stream, so a batch sees the same noise as single runs
    (the habit of diffusers' `randn_tensor`).
    """
    return _per_sample(torch.rand, like, generator) * (high - low) + low


def normal_noise(like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard Gaussian noise shaped like `like`, one stream per sample as `uniform_noise`."""
    return _per_sample(torch.randn, like, generator)


def _per_sample(draw: Callable, like: torch.Tensor, generator: Generators) -> torch.Tensor:
    generators = per_sample_generators(generator, len(like))
    if len(set(map(id, generators))) < len(generators):
        draws = [_draw(draw, like.shape, generators[0], like.dtype)]
    else:
        draws = [_draw(draw, (1, *like.shape[1:]), g, like.dtype) for g in generators]
    return torch.cat(draws).to(like.device)


def _draw(draw: Callable, shape: Sequence[int], generator: torch.Generator | None,
          dtype: torch.dtype) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return draw(shape, generator=generator, device=device, dtype=dtype)
