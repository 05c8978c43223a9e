"""What may happen to a protected photo before it is edited: JPEG, resizing, blur, noise, colour jitter,
quantization, rotation and cropping; and how another photo of the same face may differ (pose, lighting), for
FaceCloak's synthetic variations. Each transform maps `N x 3 x H x W` images in `[-1, 1]` to the same shape and
range.

Every transform except `PillowJPEG` is differentiable (rounding passes gradients straight through), so the PGD
methods can optimise through a random one each step (expectation over transformation, `eot_transform`);
`PillowJPEG` is the real codec, for measuring robustness. A parameter given as a `(low, high)` pair is drawn
uniformly per image, from that image's own generator, so a batch sees what single runs see.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .randomness import Generators, per_sample_generators

Range = float | tuple[float, float]

# The JPEG standard's example quantization tables (ITU-T T.81, Annex K), which libjpeg scales by quality.
_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)
_CHROMA = torch.full((8, 8), 99.0, dtype=torch.float64)
_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _draw(value: Range, generator: torch.Generator | None) -> float:
    if not isinstance(value, tuple):
        return float(value)
    low, high = value
    device = generator.device if generator is not None else "cpu"
    return low + (high - low) * torch.rand((), generator=generator, device=device).item()


def _round(t: torch.Tensor) -> torch.Tensor:
    """Rounding whose gradient is the identity (straight-through)."""
    return t + (torch.round(t) - t).detach()


def shrink(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`x` resized to `size` (height, width) as Pillow's bilinear shrinks a photo: antialiased (the triangle filter
    widened by the scale), clamped to `[-1, 1]`. The check's editor and platforms' resizes (`fit_long_side`)."""
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def scaled_size(height: int, width: int, scale: float, least: int = 1) -> tuple[int, int]:
    """`height x width` times `scale`, rounded, each side at least `least`."""
    return max(round(height * scale), least), max(round(width * scale), least)


def fit_long_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images shrunk (`shrink`) so that their long side is at most `size`; smaller ones (or `size` 0) are `x` itself."""
    height, width = x.shape[-2:]
    if not size or max(height, width) <= size:
        return x
    return shrink(x, scaled_size(height, width, size / max(height, width)))


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """The ITU-R BT.601 luma of `N x 3 x H x W` images, as `N x 1 x H x W`."""
    return 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]


class Transform:
    """Applies itself image by image with parameters drawn from each image's generator."""

    differentiable = True

    def __call__(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        generators = per_sample_generators(generator, len(x))
        return torch.cat([self.apply(x[i:i + 1], generators[i]) for i in range(len(x))])

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class Identity(Transform):
    def __call__(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return x

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x


class JPEG(Transform):
    """A differentiable JPEG as libjpeg (Pillow's codec) makes and reads one: 8-bit YCbCr, 4:2:0 chroma (2 x 2 means,
    edges replicated), 8 x 8 DCT quantised with the standard tables scaled by quality, each plane decoded to 8 bits,
    chroma brought back up bilinearly (libjpeg's "fancy" triangle filter) and converted to 8-bit RGB. Every rounding
    is straight-through (its gradient the identity), except the quantisation of the DCT coefficients with
    `rounding="cubic"`: there `round(t) + (t - round(t))^3` (Shin and Song, 2017), whose gradient is small near the
    levels and large between them. Within about a level of Pillow's decoding (`tests/test_transforms.py`)."""

    ROUNDINGS = ("straight", "cubic")

    def __init__(self, quality: Range = 75, rounding: str = "straight") -> None:
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"rounding must be one of {self.ROUNDINGS}, got {rounding!r}")
        self.quality, self.rounding = quality, rounding

    @staticmethod
    def tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
        quality = min(max(int(round(quality)), 1), 100)
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        return tuple(((t * scale + 50) // 100).clamp(1, 255) for t in (_LUMA, _CHROMA))

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        luma_table, chroma_table = (t.to(x) for t in self.tables(_draw(self.quality, generator)))
        quantise = _round if self.rounding == "straight" else _round_cubic
        height, width = x.shape[-2:]
        rgb = (x + 1) * 127.5
        r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
        y = _round(luma(rgb)).clamp(0, 255)
        cb = _round(-0.168736 * r - 0.331264 * g + 0.5 * b + 128).clamp(0, 255)
        cr = _round(0.5 * r - 0.418688 * g - 0.081312 * b + 128).clamp(0, 255)
        y = _round(_blocks(_pad_to(y, 8) - 128, luma_table, quantise) + 128).clamp(0, 255)[..., :height, :width]
        chroma = []
        for c in (cb, cr):
            small = _round(F.avg_pool2d(_pad_to(c, 2), 2))
            rows, cols = small.shape[-2:]
            small = _round(_blocks(_pad_to(small, 8) - 128, chroma_table, quantise) + 128).clamp(0, 255)
            chroma.append(F.interpolate(small[..., :rows, :cols], scale_factor=2, mode="bilinear",
                                        align_corners=False)[..., :height, :width])
        cb, cr = chroma
        out = torch.cat([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], dim=1)
        return _round(out.clamp(0, 255)) / 127.5 - 1


def _pad_to(plane: torch.Tensor, multiple: int) -> torch.Tensor:
    """`plane` with its last row and column repeated up to a multiple of `multiple` pixels, as libjpeg pads."""
    height, width = plane.shape[-2:]
    if not (height % multiple or width % multiple):
        return plane
    return F.pad(plane, (0, -width % multiple, 0, -height % multiple), mode="replicate")


def _round_cubic(t: torch.Tensor) -> torch.Tensor:
    """`round(t) + (t - round(t))^3`: near rounding, with a gradient that is not the identity."""
    nearest = torch.round(t).detach()
    return nearest + (t - nearest) ** 3


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype=dtype, device=device)


def _blocks(plane: torch.Tensor, table: torch.Tensor, quantise=_round) -> torch.Tensor:
    """Quantise the 8 x 8 DCT of a 1-channel plane (height and width multiples of 8) with `table`: each block's
    coefficients become `quantise(coefficients / table) * table` (`block_lowpass`: a table of ones and a mask)."""
    n, _, height, width = plane.shape
    d = _dct_matrix(plane.dtype, plane.device)
    blocks = plane.reshape(n, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
    coefficients = d @ blocks @ d.T
    restored = d.T @ (quantise(coefficients / table) * table) @ d
    return restored.permute(0, 1, 3, 2, 4).reshape(n, 1, height, width)


def block_lowpass(x: torch.Tensor, keep: int) -> torch.Tensor:
    """`x` (`N x C x H x W`) with each 8 x 8 block of each channel, on JPEG's grid from the top-left corner, reduced
    to its DCT coefficients `(u, v)` with `u + v < keep`: the frequencies JPEG quantises least (1: each block's
    mean; 15: everything). Edge blocks are padded by repeating the last row and column, as libjpeg pads, and cropped
    back. Linear and differentiable."""
    if not 1 <= keep <= 15:
        raise ValueError(f"keep must be in [1, 15], got {keep}")
    if keep == 15:
        return x
    n, channels, height, width = x.shape
    planes = _pad_to(x.reshape(n * channels, 1, height, width), 8)
    k = torch.arange(8, device=planes.device)
    low = ((k[:, None] + k[None, :]) < keep).to(planes.dtype)
    kept = _blocks(planes, torch.ones_like(low), lambda coefficients: coefficients * low)
    return kept[..., :height, :width].reshape(n, channels, height, width)


class EditorView:
    """What an editor sees of each image of a batch: its own part (`works[k]`, width x height, of the padded batch)
    shrunk as an editor shrinks a photo to its working size (`shrink`, as `evaluation.check` does; the editing
    pipelines use Pillow's Lanczos, a sharper filter of the same kind) to `seens[k]`, padded (edge pixels repeated)
    to a common multiple of 8. Not random and differentiable: an attack made through it is made for the photo as the
    editor will see it."""

    def __init__(self, works: Sequence[tuple[int, int]], seens: Sequence[tuple[int, int]]) -> None:
        self.works, self.seens = list(works), list(seens)
        self.padded = tuple(math.ceil(max(side[axis] for side in self.seens) / 8) * 8 for axis in (1, 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        views = []
        for k, ((w, h), (seen_w, seen_h)) in enumerate(zip(self.works, self.seens)):
            view = shrink(x[k:k + 1, :, :h, :w], (seen_h, seen_w))
            views.append(F.pad(view, (0, self.padded[1] - seen_w, 0, self.padded[0] - seen_h), mode="replicate"))
        return torch.cat(views)


class PillowJPEG(Transform):
    """The real codec: encode with Pillow at `quality` (4:2:0) and decode. Not differentiable."""

    differentiable = False

    def __init__(self, quality: Range = 75) -> None:
        self.quality = quality

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        array = ((x[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(round(_draw(self.quality, generator))))
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
        return (torch.from_numpy(decoded).permute(2, 0, 1)[None] / 127.5 - 1).to(x)


class Resize(Transform):
    """Downscale by `scale` (antialiased) and back up to the original size, bilinearly."""

    def __init__(self, scale: Range = 0.5) -> None:
        self.scale = scale

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        scale = _draw(self.scale, generator)
        small = shrink(x, scaled_size(height, width, scale))
        return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


class GaussianBlur(Transform):
    """Gaussian blur with standard deviation `sigma` pixels (kernel radius 3 sigma, reflected borders)."""

    def __init__(self, sigma: Range = 1.0) -> None:
        self.sigma = sigma

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        sigma = _draw(self.sigma, generator)
        radius = max(int(math.ceil(3 * sigma)), 1)
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
        padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        blurred = F.conv2d(padded, kernel.view(3, 1, 1, -1), groups=3)
        return F.conv2d(blurred, kernel.view(3, 1, -1, 1), groups=3)


class GaussianNoise(Transform):
    """Additive Gaussian noise of standard deviation `sigma` in 0..255 pixel units."""

    def __init__(self, sigma: Range = 4.0) -> None:
        self.sigma = sigma

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        sigma = _draw(self.sigma, generator) * 2 / 255
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        return (x + sigma * noise).clamp(-1, 1)


class ColorJitter(Transform):
    """Brightness, contrast and saturation factors (1 leaves the image unchanged)."""

    def __init__(self, brightness: Range = (0.9, 1.1), contrast: Range = (0.9, 1.1),
                 saturation: Range = (0.9, 1.1)) -> None:
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        u = (x + 1) / 2 * _draw(self.brightness, generator)
        mean = luma(u).mean()
        u = mean + (u - mean) * _draw(self.contrast, generator)
        gray = luma(u)
        u = gray + (u - gray) * _draw(self.saturation, generator)
        return (u.clamp(0, 1) * 2 - 1)


class Quantize(Transform):
    """Keep `bits` bits per channel (rounding straight-through)."""

    def __init__(self, bits: Range = 5) -> None:
        self.bits = bits

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        levels = 2 ** int(round(_draw(self.bits, generator))) - 1
        return _round((x + 1) / 2 * levels) / levels * 2 - 1


class Rotate(Transform):
    """Rotation by `degrees` about the centre (bilinear, borders reflected, same size)."""

    def __init__(self, degrees: Range = (-5.0, 5.0)) -> None:
        self.degrees = degrees

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        angle = math.radians(_draw(self.degrees, generator))
        cos, sin = math.cos(angle), math.sin(angle)
        height, width = x.shape[-2:]
        # a rotation of pixel coordinates, written in affine_grid's coordinates (each side mapped to [-1, 1])
        theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
                             dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class Crop(Transform):
    """A window of a fraction `scale` of each side, at a random place, resized back to the full size."""

    def __init__(self, scale: Range = (0.8, 1.0)) -> None:
        self.scale = scale

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        scale = _draw(self.scale, generator)
        h, w = max(round(height * scale), 1), max(round(width * scale), 1)
        top, left = _offset(height - h, generator), _offset(width - w, generator)
        window = x[..., top:top + h, left:left + w]
        return F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


def _offset(room: int, generator: torch.Generator | None) -> int:
    """A position drawn uniformly in `0..room`."""
    return min(int(_draw((0.0, room + 1.0), generator)), room)


class Sharing(Transform):
    """What a posted photo meets on its way to an editor, drawn per image: with probability `resize_probability` a
    downscale by a factor in `scale` (a social network's long side, an editor's working size; antialiased), then a
    JPEG at a quality in `quality`, with probability `reencode_probability` a second one at a quality in `second`
    (the photo saved again), and the image back at its size (bilinear). Differentiable: the JPEGs are `JPEG`."""

    def __init__(self, quality: Range = (60.0, 95.0), scale: Range = (0.6, 1.0), resize_probability: float = 0.5,
                 second: Range = (70.0, 95.0), reencode_probability: float = 0.3, rounding: str = "straight") -> None:
        self.scale, self.resize_probability = scale, resize_probability
        self.reencode_probability = reencode_probability
        self.first, self.second = JPEG(quality, rounding), JPEG(second, rounding)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        y = x
        if _draw((0.0, 1.0), generator) < self.resize_probability:
            scale = _draw(self.scale, generator)
            y = shrink(y, scaled_size(height, width, scale, least=8))
        y = self.first.apply(y, generator)
        if _draw((0.0, 1.0), generator) < self.reencode_probability:
            y = self.second.apply(y, generator)
        if y.shape[-2:] != (height, width):
            y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)
        return y


class ResizePad(Transform):
    """Input diversity (DI): with `probability`, shrink the image by a factor drawn from `scale` and pad it back to
    its size at a random offset with mid-grey (0); otherwise leave it unchanged."""

    def __init__(self, scale: Range = (0.9, 1.0), probability: float = 1.0) -> None:
        self.scale, self.probability = scale, probability

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if _draw((0.0, 1.0), generator) >= self.probability:
            return x
        height, width = x.shape[-2:]
        scale = _draw(self.scale, generator)
        h, w = max(round(height * scale), 1), max(round(width * scale), 1)
        top, left = _offset(height - h, generator), _offset(width - w, generator)
        small = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return F.pad(small, (left, width - w - left, top, height - h - top), value=0.0)


class RandomAffine(Transform):
    """A small change of pose: rotation (degrees), scale, shear (degrees) and translation (fraction of the side),
    about the image centre, drawn per image; borders repeat the edge pixels. `matrix` gives the drawn 2 x 3 pixel
    matrix, so that landmarks can follow the image."""

    def __init__(self, degrees: Range = (-10.0, 10.0), scale: Range = (0.9, 1.1), shear: Range = (-5.0, 5.0),
                 translate: Range = (-0.04, 0.04)) -> None:
        self.degrees, self.scale, self.shear, self.translate = degrees, scale, shear, translate

    def matrix(self, generator: torch.Generator | None, height: int, width: int) -> np.ndarray:
        angle, shear = (math.radians(_draw(v, generator)) for v in (self.degrees, self.shear))
        scale = _draw(self.scale, generator)
        shift = np.array([_draw(self.translate, generator) * width, _draw(self.translate, generator) * height])
        linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ \
            np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
        centre = np.array([(width - 1) / 2, (height - 1) / 2])
        return np.hstack([linear, (centre - linear @ centre + shift)[:, None]])

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        from .models.faces import warp_affine

        height, width = x.shape[-2:]
        matrix = torch.from_numpy(self.matrix(generator, height, width))[None]
        return warp_affine(x, matrix, (height, width), padding="border")


class Lighting(Transform):
    """Light from one side: the image (in `[0, 1]`) is multiplied by a ramp `1 + strength * d` across it, where `d`
    runs from -1 to 1 along a random direction, then raised to the power `gamma`."""

    def __init__(self, strength: Range = (0.0, 0.3), gamma: Range = (0.8, 1.25)) -> None:
        self.strength, self.gamma = strength, gamma

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        angle = _draw((0.0, 2 * math.pi), generator)
        strength, gamma = _draw(self.strength, generator), _draw(self.gamma, generator)
        v = torch.linspace(-1, 1, height, dtype=x.dtype, device=x.device)[:, None]
        u = torch.linspace(-1, 1, width, dtype=x.dtype, device=x.device)[None, :]
        ramp = 1 + strength * (math.cos(angle) * u + math.sin(angle) * v) / math.sqrt(2)
        lit = ((x + 1) / 2 * ramp).clamp(1e-6, 1) ** gamma
        return lit * 2 - 1


class Compose(Transform):
    """The transforms one after the other."""

    def __init__(self, *transforms: Transform) -> None:
        self.transforms = transforms
        self.differentiable = all(t.differentiable for t in transforms)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for transform in self.transforms:
            x = transform.apply(x, generator)
        return x


class RandomChoice(Transform):
    """One of the transforms, chosen per image."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)
        self.differentiable = all(t.differentiable for t in self.transforms)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        index = min(int(_draw((0.0, float(len(self.transforms))), generator)), len(self.transforms) - 1)
        return self.transforms[index].apply(x, generator)


#: The distributions `--eot` draws from: each covers the cleanups of the robustness benchmark.
EOT_TRANSFORMS = {
    "none": lambda: Identity(),  # the photo as posted: mixed in (`none,share`), the EOT keeps protecting it too
    "jpeg": lambda: JPEG(quality=(50, 95)),
    "resize": lambda: Resize(scale=(0.5, 0.9)),
    "blur": lambda: GaussianBlur(sigma=(0.5, 1.5)),
    "noise": lambda: GaussianNoise(sigma=(0.0, 6.0)),
    "jitter": lambda: ColorJitter(),
    "quantize": lambda: Quantize(bits=(4, 7)),
    "rotate": lambda: Rotate(degrees=(-5.0, 5.0)),
    "crop": lambda: Crop(scale=(0.8, 1.0)),
    "share": lambda: Sharing(),
    "share-cubic": lambda: Sharing(rounding="cubic"),
}


def eot_transform(names: Sequence[str]) -> Transform:
    """A random choice among the named EOT transforms (see `EOT_TRANSFORMS`)."""
    unknown = sorted(set(names) - set(EOT_TRANSFORMS))
    if unknown or not names:
        raise ValueError(f"unknown EOT transform(s) {unknown}; choose from {', '.join(EOT_TRANSFORMS)}")
    return RandomChoice([EOT_TRANSFORMS[name]() for name in names])
