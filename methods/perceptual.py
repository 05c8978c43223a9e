"""LPIPS as FaceLock's perceptual term, with the clean image's features computed once."""

from __future__ import annotations

import torch
from torch import nn

#: torchvision's VGG16 checkpoint, which `lpips.LPIPS(net="vgg")` needs beside the lpips package's own weights.
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


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
    """`lpips.LPIPS(net="vgg")`, as in the paper. The VGG16 backbone comes from torchvision's download cache; where
    it cannot be had, this raises `FileNotFoundError` naming the file and folder instead of falling back to a
    randomly initialised backbone."""
    import lpips

    checkpoint = torch.hub.get_dir() + "/checkpoints/" + VGG16_FILE
    try:
        model = lpips.LPIPS(net="vgg", verbose=False)
    except OSError as error:  # urllib's URLError is an OSError
        raise FileNotFoundError(
            f"LPIPS-VGG needs torchvision's VGG16 weights {VGG16_FILE} and could not download them ({error}); "
            f"put {VGG16_URL} at {checkpoint} (the folder follows TORCH_HOME), or pass --lpips none"
        ) from None
    return LPIPSDistance(model.eval())
