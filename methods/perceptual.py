"""Perceptual distances with the clean image's features computed once: LPIPS (FaceLock's term) and the MSE of
VGG19 relu3_4 features (Flux-Guard's)."""

from __future__ import annotations

from pathlib import Path

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


def load_lpips_vgg() -> LPIPSDistance:
    """`lpips.LPIPS(net="vgg")`, as in the paper. The VGG16 backbone is fetched into torchvision's download cache and
    checked against its SHA-256; where it cannot be had, this raises `FileNotFoundError` naming the file and folder
    instead of falling back to a randomly initialised backbone."""
    import lpips

    from .downloads import VGG16, fetch

    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / VGG16.filename
    try:
        fetch(VGG16, checkpoint)
        model = lpips.LPIPS(net="vgg", verbose=False)
    except OSError as error:  # urllib's URLError and a checksum mismatch are OSErrors
        raise FileNotFoundError(
            f"LPIPS-VGG needs torchvision's VGG16 weights {VGG16.filename} and could not download them ({error}); "
            f"put {VGG16.url} at {checkpoint} (the folder follows TORCH_HOME), or pass --lpips none"
        ) from None
    return LPIPSDistance(model.eval())


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


def load_vgg19_features() -> VGGFeatureDistance:
    """`VGGFeatureDistance` with torchvision's ImageNet VGG19 weights, fetched into its download cache and checked
    against their hash; where they cannot be had, this raises `FileNotFoundError` naming the file and folder, never
    falling back to random weights."""
    from .downloads import VGG19, fetch

    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / VGG19.filename
    try:
        state = torch.load(fetch(VGG19, checkpoint), map_location="cpu", weights_only=True)
    except OSError as error:  # urllib's URLError and a checksum mismatch are OSErrors
        raise FileNotFoundError(
            f"the VGG19 feature loss needs torchvision's weights {VGG19.filename} and could not download them "
            f"({error}); put {VGG19.url} at {checkpoint} (the folder follows TORCH_HOME), or choose another "
            f"perceptual loss"
        ) from None
    layers = vgg19_relu3_4()
    layers.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                            if k.startswith("features.") and int(k.split(".")[1]) < RELU3_4})
    return VGGFeatureDistance(layers.eval())
