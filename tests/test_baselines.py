"""EditShield, PhotoGuard's diffusion attack and what they added to the engine (the L2 threat model, transforms
paired with the clean reference), with tiny random models (CPU, offline)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import defend
import main_defend
import methods
from conftest import AUTOENCODERS, ROOT, random_images, tiny_pipeline, write_photo
from methods.base import PGDAttack, frozen, project
from methods.diffusion import gradient_checkpointing
from methods.pipeline import options as protection_options
from methods.pipeline.placement import quantize_within
from methods.randomness import uniform_noise
from methods.transforms import Rotate, eot_transform
from test_methods import build, seeded
from utils import UserError, load_image, tensor_to_uint8

FAST = ["--num_iters", "2"]


# ------------------------------------------------------------------------------------------------- L2 budget

def test_l2_projection_rescales_only_perturbations_longer_than_the_budget():
    x = random_images(3) * 0.5
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    delta[1] *= 0.1 / delta[1].norm()
    delta[2] = 0
    out = project(x + delta, x, 0.5, (-1.0, 1.0), "l2")
    moved = out - x
    assert moved[0].norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.nn.functional.cosine_similarity(moved[0].flatten(), delta[0].flatten(), dim=0) > 1 - 1e-5
    assert torch.equal(out[1:], (x + delta)[1:])  # inside the ball, and no perturbation at all: unchanged
    assert torch.equal(project(x + 2, x, 0.03, (-1.0, 1.0)), (x + 0.03).clamp(-1, 1))  # L-infinity as before


def test_l2_pgd_is_the_normalised_gradient_loop():
    """With norm="l2" the engine is: start in the largest cube inside the ball, step along grad / ||grad||_2,
    rescale into the ball, clip to the bounds."""
    attack = methods.create("encoder", autoencoder=AUTOENCODERS["tiny"](), norm="l2", eps=0.5, step_size=0.2,
                            num_iters=4)
    x = random_images(2)
    radius = 0.5 / math.sqrt(x[0].numel())
    expected = project(x + uniform_noise(x, -radius, radius, seeded(3, 4)), x, 0.5, (-1.0, 1.0), "l2")
    for i in range(4):
        y = expected.clone().requires_grad_(True)
        grad, = torch.autograd.grad(attack.objective(y, attack.prepare(x), i).sum(), [y])
        length = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = project(expected + attack.step_size_at(i) * (grad / length), x, 0.5, (-1.0, 1.0), "l2")
    with frozen(*attack.modules()):
        out = attack.perturb(x, seeded(3, 4))
    assert torch.equal(out, expected)
    assert (out - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert (out - x).abs().max() > 0.03  # far beyond what the L-infinity budget would allow in one pixel


def l2_length(a: np.ndarray, b: np.ndarray) -> float:
    """L2 length of the difference of two uint8 images, in `[-1, 1]` units (the L2 budget's)."""
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) / 127.5)


def test_l2_rounding_to_8_bits_keeps_the_budget_and_rounds_back_only_what_it_must():
    clean = np.full((20, 50, 3), 100, dtype=np.uint8)
    exact = np.full(clean.shape, 0.6)  # 3000 pixels 0.6 levels up: rounding to 1 would give length 54.8 levels
    eps = float(np.linalg.norm(exact)) / 127.5
    x_adv = torch.from_numpy((clean + exact) / 127.5 - 1).permute(2, 0, 1)[None].float()
    out = quantize_within(x_adv, clean, eps, "l2").astype(int) - 100
    assert set(np.unique(out)) == {0, 1}
    squared = int((out**2).sum())
    assert (eps * 127.5) ** 2 - 1 < squared <= (eps * 127.5) ** 2 + 1e-6  # as many as fit stay rounded up

    image = random_images(1, size=40)
    clean = tensor_to_uint8(image)
    x_adv = project(image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1)), image,
                    0.8, (-1.0, 1.0), "l2")
    out = quantize_within(x_adv, clean, 0.8, "l2")
    assert l2_length(out, clean) <= 0.8 + 1e-9
    assert np.abs(out.astype(int) - tensor_to_uint8(x_adv).astype(int)).mean() < 0.3  # mostly plain rounding


# ---------------------------------------------------------------------------------------- paired transforms

class Aligned(PGDAttack):
    """Compares the (transformed) image with the clean one, pixel by pixel."""

    name = "aligned-test"

    def prepare(self, x):
        return x

    def objective(self, y, reference, i):
        return -(y - reference).square().flatten(1).mean(dim=1)


@pytest.mark.parametrize("generators", [lambda: seeded(0, 1), lambda: [None, None]])
def test_paired_transforms_give_the_clean_reference_the_same_draw(generators):
    x = random_images(2, size=24)
    paired, single = Aligned(eot=Rotate((10.0, 20.0))), Aligned(eot=Rotate((10.0, 20.0)))
    paired.paired_transforms = True
    torch.manual_seed(0)
    first = generators()
    y, reference = paired.transformed(x, x, first, clean=x)
    assert torch.equal(y, reference) and not torch.equal(y, x)
    torch.manual_seed(0)
    second = generators()
    y_single, reference_single = single.transformed(x, x, second, clean=x)
    assert torch.equal(y, y_single) and torch.equal(reference_single, x)  # the same draw; unpaired: the clean image
    if first[0] is not None:  # each generator ends where one draw leaves it
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(first, second))


def test_editshield_compares_each_transformed_sample_with_the_clean_photo_under_the_same_transform():
    eot = eot_transform(["rotate", "crop", "blur"])
    attack = methods.create("editshield", autoencoder=AUTOENCODERS["kl"](), eot=eot, eot_samples=2)
    x = random_images(2)
    y, clean = attack.transformed(x, attack.prepare(x), seeded(0, 1), clean=x)
    torch.manual_seed(0)
    assert torch.equal(attack.objective(y, clean, 0), torch.zeros(2))  # the clean photo has moved nothing
    attack.paired_transforms = False
    y, clean = attack.transformed(x, attack.prepare(x), seeded(0, 1), clean=x)
    torch.manual_seed(0)
    assert (attack.objective(y, clean, 0) > 0).all()  # unpaired, the rotation itself would count as distance


# ------------------------------------------------------------------------------------------ diffusion attack

def unet_inputs(attack) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Record what the editor's UNet receives (sample and timestep), keeping the sample's gradient."""
    seen = []

    def hook(module, args, kwargs):
        sample = args[0]
        if sample.requires_grad:
            sample.retain_grad()
        seen.append((sample, float(args[1])))

    return seen, attack.editor.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_gradient_reaches_the_photo_through_every_unrolled_step():
    attack = build("diffusion", "kl", steps=3)
    seen, handle = unet_inputs(attack)
    x = random_images(1).requires_grad_(True)
    with frozen(*attack.modules()):
        torch.manual_seed(0)
        attack.objective(x, attack.prepare(x.detach()), 0).sum().backward()
    handle.remove()
    assert len(seen) == 3
    assert all(sample.grad is not None and sample.grad.abs().sum() > 0 for sample, _ in seen)
    assert x.grad.abs().sum() > 0  # InstructPix2Pix starts from noise: the photo reaches the result only via the UNet


def test_the_unrolled_generation_is_the_pipelines_own_edit():
    """The attack's differentiable run equals diffusers' InstructPix2Pix pipeline with the same generators
    (guidance, scheduler and random draws included)."""
    pipe = tiny_pipeline()
    attack = methods.create("diffusion", editor=pipe, steps=3, prompt="Let it be snowy", guidance_scale=5.0,
                            image_guidance_scale=1.3)
    x = random_images(2)
    with torch.no_grad():
        ours = attack.editor(x, attack.prepare(x), 3, 5.0, 1.3, 0.5, seeded(5, 6))
        theirs = pipe(["Let it be snowy"] * 2, image=(x + 1) / 2, num_inference_steps=3, guidance_scale=5.0,
                      image_guidance_scale=1.3, generator=seeded(5, 6), output_type="pt").images
    assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-4)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_img2img_runs_the_pipelines_timesteps_with_its_guidance_batch(guidance):
    pipe = tiny_pipeline(pix2pix=False)
    attack = methods.create("diffusion", editor=pipe, steps=4, strength=0.5, guidance_scale=guidance)
    seen, handle = unet_inputs(attack)
    x = random_images(2)
    with torch.no_grad():
        attack.editor(x, attack.prepare(x), 4, guidance, 1.5, 0.5, seeded(0, 1))
        ours = [(len(sample), t) for sample, t in seen]
        seen.clear()
        pipe([""] * 2, image=(x + 1) / 2, num_inference_steps=4, strength=0.5, guidance_scale=guidance,
             generator=seeded(0, 1), output_type="pt")
    handle.remove()
    assert ours == [(len(sample), t) for sample, t in seen] and len(ours) >= 2
    assert ours[0][0] == (4 if guidance > 1 else 2)
    with pytest.raises(ValueError, match=r"int\(steps \* strength\)"):
        methods.create("diffusion", editor=pipe, steps=1, strength=0.5)


@pytest.mark.parametrize("name", ["diffusion", "diffusion-img2img"])
def test_gradient_checkpointing_gives_the_same_gradient(name, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    attack = build(name, "kl")
    x = random_images(1)
    grads = {}
    for enabled in (False, True):
        calls.clear()
        y = x.clone().requires_grad_(True)
        with frozen(*attack.modules()), gradient_checkpointing(attack.editor.unet, attack.editor.autoencoder.vae,
                                                               enabled=enabled):
            torch.manual_seed(0)
            grads[enabled], = torch.autograd.grad(attack.objective(y, attack.prepare(x), 0).sum(), [y])
        assert bool(calls) == enabled  # the blocks really were checkpointed (in eval mode)
    assert not attack.editor.unet.is_gradient_checkpointing  # switched off again afterwards
    assert grads[True].abs().max() > 0
    assert torch.allclose(grads[True], grads[False], rtol=1e-4, atol=1e-6 * grads[False].abs().max().item())


def test_each_step_averages_grad_reps_generations_of_every_eot_sample():
    attack = build("diffusion", grad_reps=3, num_iters=2, eot=eot_transform(["blur"]), eot_samples=2)
    calls = []
    objective = attack.objective
    attack.objective = lambda *a: calls.append(a[-1]) or objective(*a)
    attack(random_images(1), seeded(0))
    assert calls == [0] * 6 + [1] * 6


# ------------------------------------------------------------------------------------------------ scripts

def parse(*argv: str):
    return protection_options.parse(defend.build_parser(), ["--input_path", "a.png", *argv])


def test_defaults_of_the_new_methods_and_of_the_l2_budget():
    assert parse("--defend_method", "diffusion").num_iters == 200  # the method's own default
    assert parse("--defend_method", "diffusion", "--num_iters", "5").num_iters == 5
    assert parse("--defend_method", "editshield").num_iters == 100
    l2 = parse("--defend_method", "diffusion", "--norm", "l2")
    assert (l2.attack_budget, l2.step_size, l2.num_iters) == (16.0, 1.0, 200)  # PhotoGuard's L2 attack
    assert parse("--defend_method", "encoder", "--norm", "l2", "--attack_budget", "4").attack_budget == 4.0
    assert parse("--defend_method", "encoder", "--norm", "l2", "--preset", "paper").attack_budget == 16.0
    with pytest.raises(SystemExit):
        parse("--defend_method", "encoder", "--attack_budget", "4")  # too large for L-infinity


def test_defend_protects_with_editshield_and_the_diffusion_attack(tmp_path, tiny_pix2pix_dir, tiny_img2img_dir,
                                                                   capsys):
    source = write_photo(tmp_path / "photo.png", size=(72, 64))
    clean = np.asarray(load_image(source)).astype(int)
    runs = {
        "editshield": ["--defend_method", "editshield", "--model_id", str(tiny_pix2pix_dir), "--eot",
                       "rotate,crop,blur", "--eot_samples", "2"],
        "diffusion": ["--defend_method", "diffusion", "--model_id", str(tiny_pix2pix_dir), "--diffusion_steps", "2",
                      "--grad_reps", "1"],
        "img2img": ["--defend_method", "diffusion", "--target_model", "stable-diffusion", "--model_id",
                    str(tiny_img2img_dir), "--grad_reps", "1"],
    }
    for label, argv in runs.items():
        output = tmp_path / f"{label}.png"
        assert defend.main(["--input_path", str(source), "--output_path", str(output), *argv, *FAST]) == 0
        protected = np.asarray(Image.open(output)).astype(int)
        assert protected.shape == clean.shape and 0 < np.abs(protected - clean).max() <= 3
    printed = capsys.readouterr().out
    assert "EOT over rotate,crop,blur" in printed and f"autoencoder {tiny_pix2pix_dir} (vae)" in printed
    assert f"editor instruct-pix2pix {tiny_pix2pix_dir}, 2 steps unrolled, 1 generations per step" in printed
    assert f"editor stable-diffusion {tiny_img2img_dir}, 4 steps unrolled" in printed


def test_tiling_and_compiling_reach_the_editor(tmp_path, tiny_pix2pix_dir, monkeypatch):
    from diffusers import AutoencoderKL

    compiled, tiled = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    decode = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, *a, **k: tiled.append(1) or decode(self, *a, **k))
    source = write_photo(tmp_path / "in.png", size=(96, 96))  # latents wider than the tiny VAE's 16-latent tiles
    assert defend.main(["--input_path", str(source), "--defend_method", "diffusion", "--model_id",
                        str(tiny_pix2pix_dir), "--diffusion_steps", "1", "--grad_reps", "1", "--vae_tiling",
                        "--compile", "--num_iters", "1"]) == 0
    assert compiled == ["UNet2DConditionModel"] and tiled


def test_the_l2_budget_holds_in_the_saved_file_and_is_refused_where_it_does_not_apply(tmp_path, tiny_vae_dir,
                                                                                      capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.png", size=(72, 64))
    argv = ["--image_dir", str(photos), "--output_dir", str(tmp_path / "out"), "--defend_method", "encoder",
            "--vae", str(tiny_vae_dir), "--norm", "l2", "--attack_budget", "2", *FAST]
    assert main_defend.main(argv) == 0
    protected = np.asarray(Image.open(tmp_path / "out" / "budget_2.0" / "a.png"))
    clean = np.asarray(load_image(photos / "a.png"))
    assert 1.8 < l2_length(protected, clean) <= 2.0
    assert np.abs(protected.astype(int) - clean.astype(int)).max() > 3  # what no L-infinity 0.03 run could do
    assert "largest L2" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--norm l2 work\(s\) with the methods \(encoder, .*\), not cw"):
        defend.main(["--input_path", str(photos / "a.png"), "--defend_method", "cw", "--vae", str(tiny_vae_dir),
                     "--norm", "l2", *FAST])


def test_an_editor_that_cannot_be_had_offline_is_named_in_one_line(tmp_path):
    """(editshield loads only the editor's autoencoder, whose error test_defend_cli checks)"""
    source = write_photo(tmp_path / "in.png")
    result = subprocess.run([sys.executable, str(ROOT / "defend.py"), "--input_path", str(source), "--defend_method",
                             "diffusion", "--model_id", "nobody/no-editor"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "FACELOCK_ASSETS": ""}, timeout=300)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot load the instruct-pix2pix editor nobody/no-editor")
    assert "pass a local folder" in error and "FACELOCK_ASSETS" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
