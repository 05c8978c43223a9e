"""PSNR between an edit and the clean edit, as the FaceLock code computes it (data range 1)."""

from __future__ import annotations

import torch

from .base import CleanMetric


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of `[-1, 1]` images, measured in `[0, 1]` units; identical images give inf."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two N x C x H x W batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = ((a.double() - b.double()) / 2).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(1 / mse)).float()


class PSNR(CleanMetric):
    key, title, lower_is_stronger = "psnr", "PSNR", True

    def score(self, edits: torch.Tensor, cleans: torch.Tensor) -> torch.Tensor:
        return psnr(edits, cleans)
