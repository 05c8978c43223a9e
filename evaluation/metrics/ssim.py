"""SSIM between an edit and the clean edit, as the FaceLock code computes it (torchmetrics' defaults: data range 1,
Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, mean over the channels and the valid region)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CleanMetric


def _gaussian(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of `[-1, 1]` images, measured in `[0, 1]` units."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two N x C x H x W batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images must be at least {window} pixels a side, got {tuple(a.shape[-2:])}")
    x, y = (a.double() + 1) / 2, (b.double() + 1) / 2
    channels = x.shape[1]
    g = _gaussian(window, sigma, x.dtype, x.device)
    kernels = (g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1))

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, valid region only
        return F.conv2d(F.conv2d(t, kernels[0], groups=channels), kernels[1], groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).float()


class SSIM(CleanMetric):
    key, title, lower_is_stronger = "ssim", "SSIM", True

    def score(self, edits: torch.Tensor, cleans: torch.Tensor) -> torch.Tensor:
        return ssim(edits, cleans)
