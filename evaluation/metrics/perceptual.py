"""LPIPS between an edit and the clean edit (LPIPS-VGG in the FaceLock code)."""

from __future__ import annotations

import torch
from torch import nn

from methods.models.perceptual import LPIPSDistance

from .base import CleanMetric


class LPIPS(CleanMetric):
    """Takes an `lpips.LPIPS` model (`methods.models.loading.load_lpips_vgg()` for the paper's)."""

    key, title, lower_is_stronger = "lpips", "LPIPS", False

    def __init__(self, model: nn.Module) -> None:
        self.distance = model if isinstance(model, LPIPSDistance) else LPIPSDistance(model)

    @torch.no_grad()
    def score(self, edits: torch.Tensor, cleans: torch.Tensor) -> torch.Tensor:
        device = next(self.distance.parameters()).device
        return self.distance(edits.to(device), self.distance.reference(cleans.to(device))).cpu()
