"""The attack engine and every method, with tiny random models (CPU, offline, seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import methods
from conftest import AUTOENCODERS, centre_faces, random_images, tiny_face_identity, tiny_lpips, tiny_pipeline
from methods.base import PGDAttack, frozen
from methods.models.autoencoder import as_autoencoder
from methods.models.faces import Faces, NoFaceError
from methods.pipeline.placement import quantize_within
from methods.randomness import uniform_noise
from methods.transforms import eot_transform
from utils import tensor_to_uint8

METHOD_NAMES = ["encoder", "vae", "cw", "facelock", "noise", "editshield", "diffusion"]
#: Every method, and the diffusion attack also against img2img.
CASES = [*METHOD_NAMES, "diffusion-img2img"]
ATTACKS = [name for name in CASES if name != "noise"]  # the methods with models


def build(name: str, autoencoder: str = "tiny", **options) -> methods.Attack:
    """Method `name` on tiny models; the diffusion attack's tiny editor decodes with the `autoencoder` given."""
    method, _, editor = name.partition("-")
    options.setdefault("num_iters", 3 if method == "diffusion" else 6)
    models = dict(autoencoder=AUTOENCODERS[autoencoder](), face=tiny_face_identity(), perceptual=tiny_lpips())
    if method == "diffusion":
        models["editor"] = tiny_pipeline(pix2pix=editor != "img2img")
        models["editor"].vae = vae = models["autoencoder"]
        with torch.no_grad():  # scale latents to unit spread, as Stable Diffusion's scaling factor does
            vae.register_to_config(scaling_factor=1 / as_autoencoder(vae).encode(random_images(4)).std().item())
        options = {"steps": 4 if editor else 2, "grad_reps": 1, **options}  # img2img: 4 x strength 0.5 = 2 steps
    if method == "editshield":  # a random tiny autoencoder's latents hardly depend on the image: weigh them up
        options.setdefault("fidelity_weight", 1e-4)
    return methods.create(method, **models, **options)


def autoencoder_of(attack: methods.Attack):
    return attack.editor.autoencoder if attack.name == "diffusion" else attack.autoencoder


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_registry_lists_every_method_and_builds_them_from_options():
    assert list(methods.METHODS) == [*METHOD_NAMES, "facecloak"]  # it applies a learned mask: test_facecloak.py
    attack = build("encoder", eps=0.05, step_size=0.02, targeted=False, c=1.0)  # c is not an encoder option
    assert (attack.eps, attack.step_size, attack.targeted) == (0.05, 0.02, False)
    assert build("cw", targeted=None).targeted is False  # None keeps the method's own default
    assert all(name in methods.describe() for name in METHOD_NAMES)
    with pytest.raises(ValueError, match="unknown defend method 'nope'"):
        methods.get_method("nope")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("autoencoder", ["tiny", "kl"])
def test_budget_and_bounds_hold_after_8bit_rounding(name, autoencoder):
    x = random_images(2)
    x[0, 0, :4] = 1.0  # pixels at the bounds stay inside them
    x[1, 1, :4] = -1.0
    attack = build(name, autoencoder, eps=0.03)
    x_adv = attack(x, seeded(0, 1))
    assert (x_adv - x).abs().max() <= 0.03 + 1e-6
    assert x_adv.min() >= -1 and x_adv.max() <= 1
    for clean, adv in zip(x, x_adv):
        clean8 = tensor_to_uint8(clean)
        out = quantize_within(adv, clean8, 0.03)
        assert np.abs(out.astype(int) - clean8.astype(int)).max() <= 0.03 * 127.5
    assert (x_adv - x).abs().max() > 0.01  # it did perturb


@pytest.mark.parametrize("name", CASES)
def test_input_untouched_output_detached_on_input_dtype(name):
    x = random_images(1).double()
    before = x.clone()
    x_adv = build(name)(x, seeded(0))
    assert torch.equal(x, before)
    assert x_adv.dtype == torch.float64 and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_output(name):
    attack, x = build(name), random_images(1)
    first, second = attack(x, seeded(7)), attack(x, seeded(7))
    assert torch.equal(first, second)
    assert not torch.equal(first, attack(x, seeded(8)))


@pytest.mark.parametrize("name", CASES)
def test_batch_equals_single_runs(name):
    # float64 models: in float32, batched and single convolutions round differently, and a sign step turns a
    # rounding difference on a near-zero gradient into a full step
    attack, x = build(name), random_images(3)
    for model in attack.modules():
        model.double()
    batch = attack(x, seeded(0, 1, 2))
    singles = torch.cat([attack(x[i:i + 1], seeded(i)) for i in range(3)])
    assert torch.equal(batch, singles)


@pytest.mark.parametrize("name", ATTACKS)
def test_models_frozen_during_attack_and_restored_after(name):
    attack = build(name)
    models = attack.modules()
    assert models  # every method attacks at least the autoencoder
    for model in models:
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
    seen = []
    autoencoder = autoencoder_of(attack)
    encode = autoencoder.encode
    autoencoder.encode = lambda x: seen.append(
        [(m.training, any(p.requires_grad for p in m.parameters())) for m in models]) or encode(x)
    attack(random_images(1), seeded(0))
    assert seen and all(flags == [(False, False)] * len(models) for flags in seen)
    for model in models:
        assert all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        model.eval().requires_grad_(False)  # the LPIPS model is shared between tests


def test_frozen_restores_flags_after_an_exception():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model.train()
    model[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(model):
        assert not model.training and not model[0].weight.requires_grad
        raise RuntimeError
    assert model.training and model[1].training
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_step_size_decays_linearly_as_in_the_official_code():
    attack = PGDAttack(step_size=0.01, num_iters=100)
    assert attack.step_size_at(0) == 0.01
    assert attack.step_size_at(50) == pytest.approx(0.01 - 0.0099 * 0.5)
    assert attack.step_size_at(100) == pytest.approx(0.0001)


def test_other_step_schedules():
    cosine = PGDAttack(step_size=0.01, num_iters=100, schedule="cosine")
    assert cosine.step_size_at(0) == pytest.approx(0.01) and cosine.step_size_at(100) == pytest.approx(0.0001)
    assert cosine.step_size_at(50) == pytest.approx((0.01 + 0.0001) / 2)
    assert cosine.step_size_at(25) > PGDAttack(step_size=0.01, num_iters=100).step_size_at(25)  # slower decay early
    assert PGDAttack(step_size=0.01, schedule="constant").step_size_at(99) == 0.01
    with pytest.raises(ValueError, match="schedule"):
        PGDAttack(schedule="exponential")


def test_a_monitor_sees_every_iterate():
    attack, seen = build("encoder", num_iters=4), []
    attack.monitor = lambda i, x_adv: seen.append((i, x_adv.clone()))
    out = attack(random_images(1), seeded(0))
    assert [i for i, _ in seen] == [0, 1, 2, 3] and torch.equal(seen[-1][1], out)


def test_uniform_noise_per_sample_streams_match_single_draws():
    like = torch.zeros(2, 3, 4, 4)
    batch = uniform_noise(like, -0.1, 0.1, seeded(3, 4))
    assert torch.equal(batch[1:], uniform_noise(like[:1], -0.1, 0.1, seeded(4)))
    assert batch.abs().max() <= 0.1


def test_bad_inputs_are_refused():
    attack = build("encoder")
    with pytest.raises(ValueError, match="must lie in"):
        attack(random_images(1) * 2, seeded(0))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        attack(random_images(1)[0], seeded(0))
    with pytest.raises(ValueError, match="budget"):
        build("vae", eps=0)


def noise_baseline(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + uniform_noise(x, -eps, eps, seeded(99))).clamp(-1, 1)


@torch.no_grad()
def measure(name: str, attack, x: torch.Tensor, y: torch.Tensor) -> float:
    """The quantity each method moves, measured on `y` against clean `x` (smaller is better for the attack)."""
    if name.startswith("diffusion") or name == "editshield":  # stochastic: the same draws for every image compared
        total = 0.0
        for seed in range(3):
            torch.manual_seed(seed)
            total -= attack.objective(y, attack.prepare(x), 0).item()
        return total
    ae = attack.autoencoder
    if name == "encoder-targeted":
        return ae.encode(y).norm().item()
    if name == "encoder-untargeted":
        return -(ae.encode(y) - ae.encode(x)).norm().item()
    if name == "cw":  # its own cost, which it minimises
        return -attack.objective(y, attack.prepare(x), 0).item()
    if name == "vae":
        return ae(y).norm().item()
    return attack.face(ae(y).clamp(-1, 1), attack.face.reference(x)).sum().item()


@pytest.mark.parametrize("name", ["encoder-targeted", "encoder-untargeted", "vae", "cw", "facelock", "editshield",
                                  "diffusion", "diffusion-img2img"])
def test_objective_moves_the_right_way(name):
    method, _, kind = name.partition("-")
    options = {"targeted": kind == "targeted"} if method == "encoder" else {}
    attack = build(name if method == "diffusion" else method, "kl", num_iters=10 if method == "diffusion" else 20,
                   **options)
    x = random_images(1, size=32, seed=3)
    x_adv = attack(x, seeded(0))
    assert measure(name, attack, x, x_adv) < measure(name, attack, x, noise_baseline(x, attack.eps))
    if name in ("encoder-targeted", "vae", "facelock", "diffusion", "diffusion-img2img"):
        assert measure(name, attack, x, x_adv) < measure(name, attack, x, x)


class Counting(torch.nn.Module):
    """Wraps a loss component and counts calls to `reference`."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.references = inner, 0

    def reference(self, x):
        self.references += 1
        return self.inner.reference(x)

    def forward(self, y, reference):
        return self.inner(y, reference)


def test_facelock_computes_clean_references_once_and_follows_the_official_schedule():
    face, perceptual = Counting(tiny_face_identity()), Counting(tiny_lpips())
    attack = methods.create("facelock", autoencoder=AUTOENCODERS["tiny"](), face=face, perceptual=perceptual,
                            num_iters=20)
    attack(random_images(1), seeded(0))
    assert face.references == 1 and perceptual.references == 1
    weights = [attack.weights_at(i) for i in range(20)]
    assert [w[0] for w in weights] == [0.0] * 7 + [1.0] * 13  # FR from i >= 0.35 N
    assert [w[2] for w in weights] == [0.0] * 6 + [1.0] * 14  # LPIPS from i > 0.25 N
    assert {w[1] for w in weights} == {0.2}
    no_lpips = methods.create("facelock", autoencoder=AUTOENCODERS["tiny"](), face=face, perceptual=None)
    assert no_lpips.weights_at(99)[2] == 0.0


def test_facelock_refuses_faceless_images_unless_allowed():
    def first_image_only(images):
        faces = centre_faces(images)
        return Faces(faces.index[:1], faces.boxes[:1], faces.landmarks[:1], count=len(images))

    identity = tiny_face_identity()
    identity.detector = first_image_only
    x = random_images(2)
    attack = methods.create("facelock", autoencoder=AUTOENCODERS["tiny"](), face=identity, num_iters=4)
    with pytest.raises(NoFaceError) as caught:
        attack(x, seeded(0, 1))
    assert caught.value.missing == [1]
    attack.allow_no_face = True
    x_adv = attack(x, seeded(0, 1))
    assert (x_adv - x).abs().max() <= attack.eps + 1e-6


def test_autoencoder_wrapper_casts_inputs_to_the_model_dtype():
    ae = as_autoencoder(AUTOENCODERS["kl"]().to(torch.bfloat16))
    latent = ae.encode(random_images(1))
    assert latent.dtype == torch.bfloat16 and latent.shape == (1, 4, 16, 16)
    assert ae.decode(latent).shape == (1, 3, 32, 32)


class FixedSimilarity(torch.nn.Module):
    """A face component whose similarity is fixed per sample (differentiable, so the attack runs)."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def reference(self, x):
        return type("Reference", (), {"found": torch.ones(len(x), dtype=torch.bool)})()

    def forward(self, y, reference):
        return self.values + 0 * y.sum(dim=(1, 2, 3))


def test_facelock_early_stopping_freezes_only_the_images_that_reached_the_target():
    def run(target):
        attack = methods.create("facelock", autoencoder=AUTOENCODERS["tiny"](), face=FixedSimilarity([-0.9, 0.9]),
                                num_iters=20, target_fr=target)
        calls = []
        objective = attack.objective
        attack.objective = lambda *a: calls.append(a[-1]) or objective(*a)
        return attack(random_images(2), seeded(0, 1)), calls

    free, free_calls = run(None)
    stopped, stopped_calls = run(0.0)  # image 0 (similarity -0.9) reaches it when FR starts, at i = 7
    assert free_calls == stopped_calls == list(range(20))  # image 1 never does, so the loop runs on
    assert torch.equal(stopped[1], free[1]) and not torch.equal(stopped[0], free[0])
    _, all_calls = run(2.0)  # both below 2: the loop ends at the first FR iteration
    assert all_calls == list(range(8))


LEVERS = {"momentum": {"momentum": 1.0}, "diversity": {"input_diversity": 0.7},
          "translation": {"ti_kernel": 5},
          "chroma": {"chroma": 0.3}, "smooth": {"smooth_perturbation": 3}, "dct": {"dct_keep": 3},
          "flat": {"flat_budget": 0.3},
          "sharing": {"eot": eot_transform(["share"])}, "surrogate": {"surrogate_noise": 0.1},
          "jitter": {"landmark_jitter": 3.0}, "features": {"feature_weight": 1.0},
          "shared": {"chroma": 0.5, "eot": eot_transform(["share"]), "surrogate_noise": 0.05, "landmark_jitter": 2.0}}


@pytest.mark.parametrize("lever", LEVERS)
def test_transfer_levers_keep_the_budget_reproduce_and_batch_like_singles(lever):
    attack, x = build("facelock", **LEVERS[lever]), random_images(3)
    for model in attack.modules():
        model.double()
    batch = attack(x, seeded(0, 1, 2))
    assert (batch - x).abs().max() <= attack.eps + 1e-6 and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, attack(x, seeded(0, 1, 2)))
    assert torch.equal(batch, torch.cat([attack(x[i:i + 1], seeded(i)) for i in range(3)]))
    assert not torch.equal(batch, build("facelock")(x, seeded(0, 1, 2)))  # the lever changes the attack


def test_levers_switched_off_are_plain_sign_pgd():
    """The engine with every lever off gives exactly a hand-written sign-PGD loop."""
    attack = build("encoder", momentum=0.0, input_diversity=0.0, ti_kernel=0, chroma=1.0, smooth_perturbation=0,
                   dct_keep=0, flat_budget=1.0, num_iters=5)
    x = random_images(2)
    expected = (x + uniform_noise(x, -attack.eps, attack.eps, seeded(3, 4))).clamp(x - attack.eps, x + attack.eps)
    expected = expected.clamp(-1, 1)
    for i in range(5):
        y = expected.clone().requires_grad_(True)
        grad, = torch.autograd.grad(attack.objective(y, attack.prepare(x), i).sum(), [y])
        expected = torch.minimum(torch.maximum(expected + attack.step_size_at(i) * grad.sign(), x - attack.eps),
                                 x + attack.eps).clamp(-1, 1)
    with frozen(*attack.modules()):
        assert torch.equal(attack.perturb(x, seeded(3, 4)), expected)


def test_facelock_s_levers_switched_off_change_nothing():
    x = random_images(2)
    plain = build("facelock")(x, seeded(0, 1))
    off = build("facelock", surrogate_noise=0.0, landmark_jitter=0.0, chroma=1.0, smooth_perturbation=0,
                dct_keep=0, flat_budget=1.0, feature_weight=0.0)(x, seeded(0, 1))
    assert torch.equal(plain, off)


def test_antialiased_faces_spread_the_change_over_a_large_face():
    class PassThrough(torch.nn.Module):  # an autoencoder that gives the image back: the face model alone decides
        def __init__(self) -> None:
            super().__init__()
            self.kernel = torch.nn.Conv2d(3, 3, 1)

        def encode(self, x):
            return SimpleNamespace(latents=x)

        def decode(self, z):
            return SimpleNamespace(sample=z)

    def facelock(**options):
        return methods.create("facelock", autoencoder=PassThrough(), face=tiny_face_identity(), perceptual=None,
                              latent_weight=0.0, fr_start=0.0, num_iters=3, eps=0.03, step_size=0.06,
                              schedule="constant", **options)

    x = random_images(2, size=128)  # the face three times the tiny model's 32 px crop
    attack = facelock(antialias=True)
    for model in attack.modules():  # float64: batch and single agree bit for bit
        model.double()
    batch = attack(x, seeded(0, 1))
    assert (batch - x).abs().max() <= attack.eps + 1e-6 and torch.equal(batch, attack(x, seeded(0, 1)))
    assert torch.equal(batch, torch.cat([attack(x[i:i + 1], seeded(i)) for i in range(2)]))
    assert attack.face.antialias is False  # switched off again after the call
    plain = facelock()(x, seeded(0, 1))
    face = (slice(None), slice(None), slice(50, 100), slice(45, 85))  # inside the eyes-to-mouth square
    # steps drive a pixel that gets gradient to the budget's edge; one that gets none stays at the random start
    at_edge = {name: ((y - x)[face].abs() >= attack.eps - 1e-6).float().mean().item()
               for name, y in (("plain", plain), ("antialias", batch))}
    assert at_edge["plain"] < 0.6 and at_edge["antialias"] > 0.9, at_edge


def test_luma_and_smooth_perturbations_take_the_shape_asked_for():
    x = random_images(2, size=48)
    grey = build("vae", chroma=0.0)(x, seeded(0, 1)) - x
    assert (grey - grey.mean(dim=1, keepdim=True)).abs().max() < 1e-5  # the same change on every channel: luma
    assert grey.abs().max() > 0.01
    smooth = build("vae", smooth_perturbation=5, num_iters=3)(x, seeded(0, 1)) - x
    rough = build("vae", num_iters=3)(x, seeded(0, 1)) - x
    wiggle = lambda d: (d[..., 1:] - d[..., :-1]).abs().mean()  # noqa: E731
    assert wiggle(smooth) < 0.5 * wiggle(rough)
    low = build("vae", dct_keep=2, num_iters=3)(x, seeded(0, 1)) - x
    assert wiggle(low) < 0.5 * wiggle(rough) and low.abs().max() > 0.01


def test_a_flat_budget_keeps_the_change_small_where_the_photo_is_flat():
    x = torch.zeros(1, 3, 48, 48)
    x[..., 24:] = random_images(1, size=48)[..., 24:]  # the left half flat, the right half textured
    attack = build("vae", flat_budget=0.25)
    change = (attack(x, seeded(0)) - x).abs()
    assert change[..., :, :12].max() <= 0.25 * attack.eps + 1e-6  # flat, away from the textured half's window
    assert change[..., :, 36:].max() > 0.5 * attack.eps  # textured: the whole budget is there to use
    with pytest.raises(ValueError, match="flat_budget"):
        build("vae", flat_budget=0.5, norm="l2", eps=4.0)


def test_momentum_accumulates_l1_normalised_gradients():
    attack, state = PGDAttack(momentum=0.5), {}
    g1, g2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    attack.direction(g1, state)
    direction = attack.direction(g2, state)
    mean_abs = lambda g: g.abs().flatten(1).mean(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    assert torch.allclose(state["momentum"], 0.5 * g1 / mean_abs(g1) + g2 / mean_abs(g2))
    assert torch.equal(direction, state["momentum"].sign())


def test_translation_invariance_smooths_with_a_normalised_gaussian():
    from methods.base import gaussian_smooth

    impulse = torch.zeros(1, 3, 15, 15)
    impulse[0, :, 7, 7] = 1.0
    smooth = gaussian_smooth(impulse, 7)
    assert smooth.shape == impulse.shape and torch.allclose(smooth.sum(dim=(2, 3)), torch.ones(1, 3))
    assert smooth[0, 0, 7, 7] == smooth.max() and smooth[0, 0, 7, 4] > 0 and smooth[0, 0, 7, 3] == 0
    assert torch.allclose(smooth[0, 0], smooth[0, 0].T)
    with pytest.raises(ValueError, match="odd"):
        PGDAttack(ti_kernel=4)


def test_input_diversity_shrinks_and_pads_per_image():
    from methods.transforms import ResizePad

    x = random_images(2, size=40)
    assert torch.equal(ResizePad(probability=0.0)(x, seeded(0, 1)), x)
    out = ResizePad(scale=(0.5, 0.5), probability=1.0)(x, seeded(0, 1))
    assert out.shape == x.shape
    assert (out == 0).flatten(1).float().mean(dim=1).min() >= 0.74  # a 20 x 20 image in a grey 40 x 40 canvas
    assert torch.equal(out[1:], ResizePad(scale=(0.5, 0.5), probability=1.0)(x[1:], seeded(1)))
    y = x.clone().requires_grad_(True)
    ResizePad(scale=(0.8, 0.9))(y, seeded(2, 3)).sum().backward()
    assert y.grad.abs().sum() > 0
