"""What happens to a photo between its protection and its edit: the ways of sharing it that `evaluation.check`
plays (as posted, re-compressed, resized for a social network) and the cleanups of the robustness benchmarks (JPEG,
resizing, blur, noise, colour jitter, quantization and combinations). Each maps `N x 3 x H x W` images in `[-1, 1]`
to images of the same shape; each result is 8-bit, as a saved file."""

from __future__ import annotations

from typing import Callable

import torch

from methods.transforms import (
    ColorJitter,
    Compose,
    GaussianBlur,
    GaussianNoise,
    Identity,
    PillowJPEG,
    Quantize,
    Resize,
    Transform,
    fit_long_side,
)

#: The long side a social network resizes a posted photo to.
SOCIAL_LONG_SIDE = 1080


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Rounded to 8-bit levels, as a saved file."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


#: What happens to a photo when it is posted, in order of harshness.
SHARING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "as posted": to_8bit,
    "JPEG 75": PillowJPEG(75),
    f"{SOCIAL_LONG_SIDE} px + JPEG 85": lambda x: PillowJPEG(85)(to_8bit(fit_long_side(x, SOCIAL_LONG_SIDE))),
}
class Posted(Transform):
    """The way of sharing `SHARING[name]` as a cleanup (not differentiable)."""

    differentiable = False

    def __init__(self, name: str) -> None:
        self.name = name

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return SHARING[self.name](x)


#: The cleanups a protected photo meets before the edit in the robustness benchmarks (apply `to_8bit` after).
CLEANUPS: dict[str, Transform] = {
    "none": Identity(),
    "jpeg90": PillowJPEG(90),
    "jpeg75": PillowJPEG(75),
    "jpeg50": PillowJPEG(50),
    "resize0.5": Resize(0.5),
    "blur1": GaussianBlur(1.0),
    "noise4": GaussianNoise(4.0),
    "jitter": ColorJitter(brightness=1.1, contrast=0.9, saturation=1.1),
    "quant5": Quantize(5),
    "resize0.5+jpeg75": Compose(Resize(0.5), PillowJPEG(75)),
    "blur1+jpeg75": Compose(GaussianBlur(1.0), PillowJPEG(75)),
    "noise4+jitter+jpeg90": Compose(GaussianNoise(4.0), ColorJitter(1.1, 0.9, 1.1), PillowJPEG(90)),
    "1080+jpeg85": Posted(f"{SOCIAL_LONG_SIDE} px + JPEG 85"),
}
