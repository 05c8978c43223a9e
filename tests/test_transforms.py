"""Cleanup transforms and expectation over transformation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import methods
from conftest import AUTOENCODERS, ROOT, random_images
from methods.transforms import (
    EOT_TRANSFORMS,
    JPEG,
    ColorJitter,
    Compose,
    Crop,
    GaussianBlur,
    GaussianNoise,
    Lighting,
    PillowJPEG,
    Quantize,
    RandomAffine,
    RandomChoice,
    Resize,
    Rotate,
    Sharing,
    block_lowpass,
    eot_transform,
)
from utils import load_image, pil_to_tensor

TRANSFORMS = {
    "jpeg": JPEG(75), "jpeg-range": JPEG((50, 95)), "pillow-jpeg": PillowJPEG(75), "resize": Resize(0.5),
    "blur": GaussianBlur(1.0), "noise": GaussianNoise(4.0), "jitter": ColorJitter(), "quantize": Quantize(5),
    "compose": Compose(Resize(0.5), PillowJPEG(75)), "eot": eot_transform(list(EOT_TRANSFORMS)),
    "rotate": Rotate((-10.0, 10.0)), "crop": Crop((0.7, 0.9)),
    "pose": RandomAffine(), "lighting": Lighting(),
    "jpeg-cubic": JPEG(75, rounding="cubic"), "sharing": Sharing(resize_probability=1.0, reencode_probability=1.0),
}


def portrait(size: int = 96) -> torch.Tensor:
    return pil_to_tensor(load_image(ROOT / "assets" / "astronaut.png").resize((size, size), Image.LANCZOS))


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_shape_range_and_determinism(name):
    transform, x = TRANSFORMS[name], torch.cat([portrait(), random_images(1, size=96)])[..., :90, :84]
    out = transform(x, seeded(0, 1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    assert torch.equal(out, transform(x, seeded(0, 1)))
    assert torch.equal(out[1:], transform(x[1:], seeded(1)))  # each image draws from its own generator
    assert not torch.equal(out, x)


@pytest.mark.parametrize("name", [n for n, t in TRANSFORMS.items() if t.differentiable])
def test_differentiable_transforms_pass_gradients(name):
    x = portrait(64).requires_grad_(True)
    TRANSFORMS[name](x, seeded(3)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_none_mixed_in_leaves_some_draws_as_posted():
    x = portrait(64)
    mixed = eot_transform(["none", "share"])
    unchanged = [torch.equal(mixed(x, seeded(seed)), x) for seed in range(20)]
    assert 3 < sum(unchanged) < 17  # about half the draws keep the photo as it is, the others share it


def test_the_real_codec_is_not_claimed_differentiable():
    assert not PillowJPEG.differentiable and not Compose(Resize(0.5), PillowJPEG(75)).differentiable
    assert RandomChoice([Resize(0.5), JPEG(75)]).differentiable


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_differentiable_jpeg_is_close_to_the_real_codec(quality):
    x = portrait(128)
    ours, real = JPEG(quality)(x), PillowJPEG(quality)(x)
    psnr = 10 * torch.log10(4 / (ours - real).square().mean())
    loss = 10 * torch.log10(4 / (real - x).square().mean())
    assert psnr > loss + 3  # much closer to the real codec than the codec is to the photo
    assert psnr > 30


def test_fixed_transforms_do_what_they_say():
    x = portrait(64)
    assert torch.allclose(ColorJitter(1.0, 1.0, 1.0)(x), x, atol=1e-6)
    assert len(torch.unique(Quantize(5)(x))) <= 32
    assert (GaussianBlur(1.0)(x) - x).abs().mean() < (GaussianBlur(2.0)(x) - x).abs().mean()
    square = x[..., :48, :48]
    assert torch.allclose(Rotate(90.0)(square), torch.rot90(square, 1, dims=(2, 3)), atol=1e-5)  # counter-clockwise
    assert torch.allclose(Rotate(0.0)(x), x, atol=1e-4) and torch.equal(Crop(1.0)(x), x)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    window = Crop(0.5)(ramp, seeded(0))  # half of each side, blown up: half of the ramp's span
    assert 0.9 < (window.max() - window.min()).item() < 1.1 and torch.allclose(window[..., 0, :], window[..., -1, :])
    noise = GaussianNoise(4.0)(torch.zeros(1, 3, 64, 64), seeded(0))
    assert noise.std().item() * 127.5 == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="unknown EOT"):
        eot_transform(["jpeg", "sepia"])


def test_pose_moves_the_image_and_its_matrix_moves_points_alike():
    x = torch.full((1, 3, 64, 64), -1.0)
    x[..., 20, 40] = 1.0  # a bright dot at (x=40, y=20)
    quarter = RandomAffine(degrees=90.0, scale=1.0, shear=0.0, translate=0.0)
    assert torch.allclose(quarter(x), torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)  # y down: a clockwise turn
    pose = RandomAffine(degrees=12.0, scale=0.8, shear=3.0, translate=0.05)
    moved = pose(x, seeded(5))[0, 0]
    matrix = pose.matrix(seeded(5)[0], 64, 64)  # the draw the call made
    target = matrix @ [40, 20, 1]
    y, x_ = divmod(int(moved.argmax()), 64)
    assert abs(x_ - target[0]) <= 1 and abs(y - target[1]) <= 1


def test_lighting_brightens_one_side_and_is_neutral_without_strength():
    x = torch.zeros(1, 3, 32, 32)
    assert torch.allclose(Lighting(strength=0.0, gamma=1.0)(x, seeded(0)), x, atol=1e-6)
    lit = Lighting(strength=0.5, gamma=1.0)(x, seeded(0))
    assert lit.max() - lit.min() > 0.4  # a ramp across the image


def test_eot_changes_the_attack_and_keeps_batch_equal_to_single_runs():
    def attack(eot, samples=2):
        a = methods.create("encoder", autoencoder=AUTOENCODERS["tiny"](), num_iters=4, eot=eot, eot_samples=samples)
        for model in a.modules():
            model.double()
        return a

    x = random_images(2)
    eot = eot_transform(["jpeg", "resize", "blur", "noise"])
    with_eot = attack(eot)
    batch = with_eot(x, seeded(0, 1))
    assert torch.equal(batch, torch.cat([with_eot(x[i:i + 1], seeded(i)) for i in range(2)]))
    assert not torch.equal(batch, attack(None)(x, seeded(0, 1)))
    assert (batch - x).abs().max() <= 0.03 + 1e-6
    with pytest.raises(ValueError, match="eot_samples"):
        attack(eot, samples=0)


@pytest.mark.parametrize("size", [(64, 64), (97, 97), (173, 131), (256, 256)])
@pytest.mark.parametrize("quality", [50, 75, 90, 95])
def test_the_differentiable_jpeg_decodes_within_a_level_of_pillow(size, quality):
    """Tolerance, against Pillow's libjpeg at the same quality and size (odd sizes too): a mean difference of at most
    1.1 levels of 255, at least 85 % of the values within 2 levels, and at most a third of the distance between the
    photo and Pillow's decoding of it (measured: 0.5 to 1.1 levels, 89 to 96 %)."""
    x = pil_to_tensor(load_image(ROOT / "assets" / "astronaut.png").resize(size, Image.LANCZOS))
    ours, pillows = ((t + 1) * 127.5 for t in (JPEG(quality)(x), PillowJPEG(quality)(x)))
    difference = (ours - pillows).abs()
    assert difference.mean() <= 1.1 and (difference <= 2).float().mean() >= 0.85
    assert difference.mean() <= ((x + 1) * 127.5 - pillows).abs().mean() / 3


def test_the_block_lowpass_keeps_the_low_dct_coefficients_of_jpegs_blocks():
    x = random_images(2, size=16)
    assert torch.equal(block_lowpass(x, 15), x)
    means = torch.nn.functional.avg_pool2d(x, 8).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    assert torch.allclose(block_lowpass(x, 1), means, atol=1e-6)  # u + v < 1: each block's mean
    low = block_lowpass(x, 4)
    assert torch.allclose(block_lowpass(low, 4), low, atol=1e-6) and not torch.allclose(low, x, atol=0.05)
    odd = random_images(1, size=37)[..., :29]
    assert block_lowpass(odd, 3).shape == odd.shape
    with pytest.raises(ValueError, match="keep"):
        block_lowpass(x, 0)


def test_a_perturbation_kept_to_low_dct_coefficients_survives_the_real_jpeg_better():
    """At the same largest change (4/255), Pillow's JPEG at quality 75 keeps more than twice as much of a random
    perturbation reduced to its u + v < 3 coefficients as of the raw one (measured: 48 % against 19 %)."""
    x, raw = portrait(128), 4 / 127.5 * torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)).sign()
    low = block_lowpass(raw, 3)
    low = low / low.abs().max() * raw.abs().max()

    def kept(d):
        return (((PillowJPEG(75)((x + d).clamp(-1, 1)) - PillowJPEG(75)(x)) * d).sum() / (d * d).sum()).item()

    assert kept(low) > 2 * kept(raw)


def test_the_cubic_rounding_passes_a_gradient_that_is_not_the_identity():
    x = portrait(64).requires_grad_(True)
    straight, = torch.autograd.grad(JPEG(50)(x).sum(), [x])
    cubic, = torch.autograd.grad(JPEG(50, rounding="cubic")(x).sum(), [x])
    assert cubic.abs().sum() > 0 and not torch.allclose(straight, cubic)
    with pytest.raises(ValueError, match="rounding"):
        JPEG(75, rounding="floor")


def test_sharing_resizes_and_reencodes_as_drawn_per_image():
    x = portrait(96)
    always, never = Sharing(resize_probability=1.0, scale=0.5), Sharing(resize_probability=0.0,
                                                                         reencode_probability=0.0)
    once = never(x, seeded(0))
    draws = seeded(0)[0]
    torch.rand((), generator=draws)  # the draw that decides the resize
    quality = 60 + 35 * torch.rand((), generator=draws).item()
    assert torch.equal(once, JPEG(quality)(x))  # no resize: one JPEG at the quality drawn next
    blurred = always(x, seeded(0))
    detail = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert blurred.shape == x.shape and detail(blurred) < detail(once)  # halved and brought back: softer
