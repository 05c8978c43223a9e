"""LPIPS as FaceLock's perceptual term, with the clean image's features computed once."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


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
