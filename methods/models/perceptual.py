"""Perceptual distances with the clean image's features computed once: LPIPS (FaceLock's term) and the MSE of
VGG19 relu3_4 features (Flux-Guard's)."""

from __future__ import annotations

import torch
from torch import nn

#: VGG19's layers up to relu3_4 (torchvision's `features[:18]`).
RELU3_4 = 18


class LPIPSDistance(nn.Module):
    """Wraps an `lpips.LPIPS` model (images in `[-1, 1]`); `reference(x)` keeps the clean features and
    `self(y, reference)` returns one distance per image, equal to `lpips_model(y, x)` flattened."""

    def __init__(self, lpips_model: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips_model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        import lpips

        kernel = next(self.lpips.net.parameters())
        outputs = self.lpips.net(self.lpips.scaling_layer(x.to(kernel.dtype)))
        return [lpips.normalize_tensor(out) for out in outputs]

    def reference(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.detach() for f in self.features(x)]

    def forward(self, y: torch.Tensor, reference: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for layer, (fy, fx) in enumerate(zip(self.features(y), reference)):
            total = total + self.lpips.lins[layer]((fy - fx) ** 2).mean(dim=(2, 3))
        return total.flatten().float()


class VGGFeatureDistance(nn.Module):
    """Flux-Guard's perceptual loss: the mean squared difference of VGG19 relu3_4 features (images in `[-1, 1]`,
    normalised with ImageNet's statistics as torchvision's VGG expects); `reference(x)` keeps the clean features
    and `self(y, reference)` returns one distance per image."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def features(self, x: torch.Tensor) -> torch.Tensor:
        kernel = next(self.layers.parameters())
        mean = torch.tensor(self.MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=x.device).view(1, 3, 1, 1)
        return self.layers((((x.float() + 1) / 2 - mean) / std).to(kernel.dtype)).float()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).detach()

    def forward(self, y: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return (self.features(y) - reference).square().flatten(1).mean(dim=1)


def vgg19_relu3_4() -> nn.Sequential:
    """VGG19's layers up to relu3_4, randomly initialised (load torchvision's weights into it)."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["E"])[:RELU3_4]
