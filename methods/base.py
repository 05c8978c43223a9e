"""The attack engine shared by every protection method.

`Attack` enforces the threat model once: the L-infinity budget around the clean image, the `[-1, 1]` bounds,
frozen models during the attack, and a detached result on the input's device and dtype. `PGDAttack` adds the
projected sign-gradient loop of the FaceLock and PhotoGuard code; a PGD method only says what it computes once on
the clean images (`prepare`) and what it maximises (`objective`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .progress import ProgressBar, progress_bar
from .randomness import Generators, per_sample_generators, uniform_noise
from .transforms import block_lowpass, luma

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode with no parameter gradients; restore both flags on exit."""
    submodules = {id(m): m for module in modules for m in module.modules()}.values()
    parameters = {id(p): p for module in modules for p in module.parameters()}.values()
    training = [(m, m.training) for m in submodules]
    requires_grad = [(p, p.requires_grad) for p in parameters]
    try:
        for m, _ in training:
            m.train(False)
        for p, _ in requires_grad:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training:
            m.train(flag)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


NORMS = ("linf", "l2")
#: The local texture (standard deviation, 8-bit levels) at and above which `flat_budget` gives the whole budget.
TEXTURE_LEVELS = 8.0
#: An L2 attack's step length as a share of its budget (the L2 length of the whole change): an eighth.
L2_STEP = 1 / 8


def budget_limit(norm: str, bounds: tuple[float, float] = (-1.0, 1.0)) -> float:
    """The largest budget that means anything: the width of the bounds per pixel (L-infinity); none for L2."""
    return bounds[1] - bounds[0] if norm == "linf" else math.inf


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, bounds: tuple[float, float],
            norm: str = "linf") -> torch.Tensor:
    """Bring `x_adv` into the ball of radius `eps` around `x`, then into `bounds`. L-infinity clips every pixel;
    L2 rescales each image's whole perturbation to length `eps` where it is longer (PhotoGuard's `torch.renorm`).
    Clipping to the bounds afterwards only shortens a perturbation, so the result stays in the ball."""
    if norm == "l2":
        delta = x_adv - x
        length = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
        # a zero perturbation keeps its scale 1 (and, under autograd, a finite gradient)
        x_adv = x + delta * (eps / length.clamp_min(1e-12)).clamp(max=1.0)
    else:
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    return x_adv.clamp(*bounds)


def _rng_states(generators: list[torch.Generator | None]) -> list[torch.Tensor]:
    """The state of each generator (of the global CPU generator for None), for `_set_rng_states`."""
    return [g.get_state() if g is not None else torch.get_rng_state() for g in generators]


def _set_rng_states(generators: list[torch.Generator | None], states: list[torch.Tensor]) -> None:
    for g, state in zip(generators, states):
        g.set_state(state) if g is not None else torch.set_rng_state(state)


class Attack:
    """Base class of every protection method.

    Images are `N x 3 x H x W` tensors in `[-1, 1]`. Calling the attack returns protected images within `eps`
    (L-infinity, in the same `[-1, 1]` units; or, with `norm="l2"`, the L2 length of each image's whole
    perturbation) of the input and inside the bounds, detached, on the input's device and in its dtype; the input
    is never modified. Models listed by `modules()` are frozen (eval mode, no parameter gradients) for the
    duration of the call and restored afterwards. Internally the perturbation is optimised in float32 whatever the
    input dtype; each model wrapper casts to its own dtype.

    Subclasses implement `perturb(x, generator)`, usually as a loop over `objective` (the value one iteration
    computes and the attack increases) with what `prepare` computed once on the clean images.
    """

    name: str = ""
    summary: str = ""
    models: tuple[str, ...] = ()
    bounds: tuple[float, float] = (-1.0, 1.0)
    #: Defaults this method declares over the project's and the presets' (options given explicitly still win).
    defaults: dict = {}
    #: Where the method goes on a photo: "region" (the whole photo or the square around its faces, scaled to the
    #: work size) or "photo" (the whole photo at its own size, whatever the region; `placement_reason` says why).
    placement: str = "region"
    placement_reason: str = ""
    #: Whether the method learns something once (FaceCloak's identity mask) before it protects photos.
    learns: bool = False
    #: What to do about a photo in which the method finds no face.
    no_face_hint: str = "pass --allow_no_face to protect it with the latent and perceptual terms only"

    def __init__(self, eps: float = 0.03, progress: bool = False, norm: str = "linf") -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        limit = budget_limit(norm, self.bounds)
        if not 0 < eps <= limit:
            raise ValueError(f"the budget eps must be in (0, {limit}], got {eps}")
        self.eps = eps
        self.norm = norm
        self.progress = progress

    def modules(self) -> list[nn.Module]:
        """The models to freeze during the attack."""
        return [getattr(self, name) for name in self.models if isinstance(getattr(self, name), nn.Module)]

    def __call__(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"expected a float N x 3 x H x W batch, got {tuple(x.shape)} {x.dtype}")
        low, high = self.bounds
        if x.min() < low or x.max() > high:
            raise ValueError(f"images must lie in [{low}, {high}], got [{x.min().item():.3f}, {x.max().item():.3f}]")
        clean = x.detach().float()
        with frozen(*self.modules()):
            x_adv = self.perturb(clean, generator)
        return self.project(x_adv.detach().float(), clean).to(x.dtype)

    def protect(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The protected images and, for a method whose budget varies per pixel, that budget (`N x 1 x H x W`, `[-1, 1]`
        units) for rounding them to 8 bits; None where the budget is `eps` everywhere (most methods)."""
        return self(x, generator), None

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x_adv` brought into this attack's budget around `x` and into the bounds."""
        return project(x_adv, x, self.eps, self.bounds, self.norm)

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> Any:
        """What the objective needs from the clean images, computed once (without gradients)."""
        return None

    def objective(self, x_adv: torch.Tensor, reference: Any, i: int) -> torch.Tensor:
        """The per-sample value (shape `N`) that the attack increases at iteration `i`: one iteration's work, which
        `evaluation/benchmarks/speed.py` times for every method."""
        raise NotImplementedError

    def iterations(self, total: int, desc: str) -> ProgressBar:
        return progress_bar(range(total), desc=desc, leave=False, disable=not self.progress)


class PGDAttack(Attack):
    """Projected gradient ascent with sign steps, as in the PhotoGuard and FaceLock code.

    Uniform random start in the budget, step size decaying from `step_size` to `step_size / 100` (linearly, as the
    official code, or along a half cosine with `schedule="cosine"`; `"constant"` keeps it), projection onto the
    budget and bounds after every step, and a fresh graph per step (nothing accumulates
    across iterations). Subclasses supply `prepare` (computed once on the clean images, without gradients) and
    `objective` (one value per sample, maximised).

    Expectation over transformation: with `eot` (a random differentiable transform, see `methods.transforms`),
    each step follows the gradient averaged over `eot_samples` transformed copies, so the protection survives
    the cleanups it is optimised for. Transforms are drawn from each image's own generator.

    Transfer levers (each off by default, so that the attack is plain PGD; each usable by any PGD method):

    - `momentum` (MI-FGSM, Dong et al., CVPR 2018, https://arxiv.org/abs/1710.06081): steps follow the sign of
      `g = momentum * g + grad / mean|grad|` (per image) instead of the sign of the gradient.
    - `input_diversity` (DI, Xie et al., CVPR 2019, https://arxiv.org/abs/1803.06978): with this probability per
      image and step, the input is shrunk by a random factor in `[diversity_scale, 1]` and padded back to its size
      at a random offset (`methods.transforms.ResizePad`), after the EOT transform.
    - `ti_kernel` (TI, Dong et al., CVPR 2019, https://arxiv.org/abs/1904.02884): the gradient is smoothed by a
      Gaussian kernel of this many pixels (odd; standard deviation `(ti_kernel - 1) / 6`) before the step.

    Levers that shape the perturbation for the way photos are shared (each off by default):

    - `chroma` (below 1): the perturbation's colour part (what is left after its luma, BT.601) is scaled by this
      factor after every step, so the budget goes to luminance, which JPEG keeps at full resolution and quantises
      more finely than chroma (0: grey changes only).
    - `smooth_perturbation` (odd, in pixels): after every step the perturbation is smoothed by a Gaussian of this
      size, so it lives in the low frequencies JPEG keeps.
    - `dct_keep` (1 to 14): after every step each 8 x 8 block of the perturbation, on JPEG's grid, keeps only its
      DCT coefficients `(u, v)` with `u + v < dct_keep` (`methods.transforms.block_lowpass`): the change lives in
      the coefficients JPEG quantises least (0: off).
    - `flat_budget` (below 1): a per-pixel budget map, the fraction `flat_budget` of `eps` where the clean photo is
      flat (local standard deviation 0) rising to all of `eps` where its texture is `TEXTURE_LEVELS` 8-bit levels
      or more (7 x 7 windows of luma): the change goes where texture hides it. L-infinity only.

    `norm="l2"` (PhotoGuard's L2 attack) measures the budget as the L2 length of each image's perturbation: steps
    follow the L2-normalised gradient instead of its sign, projection rescales the perturbation, and the random
    start is uniform in the largest cube inside the ball.

    A method whose objective compares with the clean image (an untargeted distance) sets `paired_transforms`:
    each EOT or input-diversity sample is then compared with `prepare` of the clean images under the same random
    transform, so that the transform itself (a rotation, a crop) does not count as distance.
    """

    paired_transforms = False

    def __init__(self, eps: float = 0.03, step_size: float = 0.01, num_iters: int = 100,
                 eot: Callable[[torch.Tensor, Generators], torch.Tensor] | None = None, eot_samples: int = 1,
                 momentum: float = 0.0, input_diversity: float = 0.0, diversity_scale: float = 0.9,
                 ti_kernel: int = 0, schedule: str = "linear", norm: str = "linf", chroma: float = 1.0,
                 smooth_perturbation: int = 0, flat_budget: float = 1.0, dct_keep: int = 0, progress: bool = False):
        super().__init__(eps=eps, progress=progress, norm=norm)
        if not 0 <= chroma <= 1 or smooth_perturbation < 0 or (smooth_perturbation and smooth_perturbation % 2 == 0) \
                or not 0 < flat_budget <= 1 or (flat_budget < 1 and norm != "linf") or not 0 <= dct_keep <= 14:
            raise ValueError(f"need chroma in [0, 1], smooth_perturbation 0 or odd, flat_budget in (0, 1] (below 1 "
                             f"with an L-infinity budget only) and dct_keep in [0, 14], got {chroma}, "
                             f"{smooth_perturbation}, {flat_budget} and {dct_keep}")
        self.chroma, self.smooth_perturbation, self.flat_budget = chroma, smooth_perturbation, flat_budget
        self.dct_keep = dct_keep
        self._budget: torch.Tensor | None = None  # the per-pixel budget of the call in progress (flat_budget)
        if step_size <= 0 or num_iters < 1 or eot_samples < 1:
            raise ValueError(f"need step_size > 0, num_iters >= 1 and eot_samples >= 1, got {step_size}, "
                             f"{num_iters} and {eot_samples}")
        if momentum < 0 or not 0 <= input_diversity <= 1 or not 0 < diversity_scale <= 1 or (
                ti_kernel and (ti_kernel < 0 or ti_kernel % 2 == 0)):
            raise ValueError(f"need momentum >= 0, input_diversity in [0, 1], diversity_scale in (0, 1] and ti_kernel "
                             f"0 or odd, got {momentum}, {input_diversity}, {diversity_scale} and {ti_kernel}")
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        self.step_size, self.schedule = step_size, schedule
        self.num_iters = num_iters
        #: Called as `monitor(i, x_adv)` after every step (benchmarks record protection against time with it).
        self.monitor: Callable[[int, torch.Tensor], None] | None = None
        #: What the models see of the images (`transforms.EditorView`: the editor's resize), after the EOT transform
        #: and before input diversity, in the objective and in `prepare`; None: the images themselves.
        self.view: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.eot, self.eot_samples = eot, eot_samples
        self.momentum, self.ti_kernel = momentum, ti_kernel
        self.diversity = None
        if input_diversity > 0:
            from .transforms import ResizePad

            self.diversity = ResizePad(scale=(diversity_scale, 1.0), probability=input_diversity)

    SCHEDULES = ("linear", "cosine", "constant")

    def step_size_at(self, i: int) -> float:
        low, progress = self.step_size / 100, i / self.num_iters
        if self.schedule == "linear":
            return self.step_size - (self.step_size - low) * progress
        if self.schedule == "cosine":
            return low + (self.step_size - low) * (1 + math.cos(math.pi * progress)) / 2
        return self.step_size

    def reached(self, reference: Any, i: int) -> torch.Tensor | None:
        """Per sample, after `objective` at iteration `i`: has it reached the attack's goal? Such samples keep their
        current value and take no further step; the loop ends when all have. None: no early stopping."""
        return None

    def value_and_grad(self, x_adv: torch.Tensor, reference: Any, i: int, generators: list,
                       clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective and its gradient at `x_adv`, averaged over the EOT samples (one graph at a time).
        `clean` (the clean images) is needed by `paired_transforms` only."""
        samples = self.eot_samples if self.eot is not None else 1
        value, grad = 0, 0
        for _ in range(samples):
            x = x_adv.detach().requires_grad_(True)
            y, paired = self.transformed(x, reference, generators, clean)
            sample = self.objective(y, paired, i)
            value = value + sample.detach()
            grad = grad + torch.autograd.grad(sample.sum(), [x])[0]
        return value / samples, grad

    def transformed(self, x: torch.Tensor, reference: Any, generators: list,
                    clean: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """`x` under one draw of the random input transforms (EOT, then input diversity) and the reference to
        compare it with: `reference` itself, or with `paired_transforms`, `prepare` of `clean` under the same draw
        (the generators end where a single draw leaves them)."""
        states = _rng_states(generators) if self.paired_transforms and clean is not None else None
        y = self._transform(x, generators)
        if states is None or y is x:
            return y, reference
        after = _rng_states(generators)
        _set_rng_states(generators, states)
        with torch.no_grad():
            reference = self.prepare(self._transform(clean, generators))
        _set_rng_states(generators, after)
        return y, reference

    def _transform(self, x: torch.Tensor, generators: list) -> torch.Tensor:
        if self.eot is not None:
            x = self.eot(x, generators)
        if self.view is not None:
            x = self.view(x)
        return self.diversity(x, generators) if self.diversity is not None else x

    def direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """The step direction from this iteration's gradient: smoothed (TI), accumulated (momentum), then its sign
        (L2: divided by its length). `state` carries the momentum from one iteration to the next."""
        if self.ti_kernel > 1:
            grad = gaussian_smooth(grad, self.ti_kernel)
        if self.momentum > 0:
            scale = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            grad = state["momentum"] = self.momentum * state.get("momentum", 0) + grad / scale
        if self.norm == "l2":
            return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return grad.sign()

    def budget_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-pixel budget (`N x 1 x H x W`) of `flat_budget` for clean images `x`; None when it is off."""
        if self.flat_budget >= 1:
            return None
        grey = luma((x + 1) * 127.5)
        mean = F.avg_pool2d(grey, 7, stride=1, padding=3, count_include_pad=False)
        square = F.avg_pool2d(grey**2, 7, stride=1, padding=3, count_include_pad=False)
        texture = (square - mean**2).clamp_min(0).sqrt()
        return self.eps * (self.flat_budget + (1 - self.flat_budget) * (texture / TEXTURE_LEVELS).clamp(max=1))

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._budget is None:
            return super().project(x_adv, x)
        return project(x_adv, x, self._budget, self.bounds, self.norm)

    def shape(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x_adv` with its perturbation shaped by `chroma`, `smooth_perturbation` and `dct_keep` (unchanged when all
        are off)."""
        if self.chroma >= 1 and not self.smooth_perturbation and not self.dct_keep:
            return x_adv
        delta = x_adv - x
        if self.chroma < 1:
            grey = luma(delta)
            delta = grey + self.chroma * (delta - grey)
        if self.smooth_perturbation:
            delta = gaussian_smooth(delta, self.smooth_perturbation)
        if self.dct_keep:
            delta = block_lowpass(delta, self.dct_keep)
        return x + delta

    def start(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        """The first iterate: uniform noise in the budget (L2: in the largest cube inside the ball) around `x`. An
        attack that continues from a given point overrides it."""
        radius = self.eps if self.norm == "linf" else self.eps / math.sqrt(x[0].numel())
        return self.project(self.shape(x + uniform_noise(x, -radius, radius, generator), x), x)

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        self._budget = self.budget_map(x)
        try:
            return self._perturb(x, generator)
        finally:
            self._budget = None

    def _perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        with torch.no_grad():
            reference = self.prepare(x if self.view is None else self.view(x))
        x_adv = self.start(x, generator)
        active = torch.ones(len(x), 1, 1, 1, dtype=torch.bool, device=x.device)
        generators = per_sample_generators(generator, len(x))
        state: dict = {}
        bar = self.iterations(self.num_iters, desc=self.name)
        for i in bar:
            value, grad = self.value_and_grad(x_adv, reference, i, generators, x)
            reached = self.reached(reference, i)
            if reached is not None:
                active &= ~reached.view(-1, 1, 1, 1).to(active.device)
                if not active.any():
                    logger.info("%s: every image reached its goal after %d iterations", self.name, i)
                    return x_adv.detach()
            step = self.step_size_at(i) * self.direction(grad, state) * active
            x_adv = self.project(self.shape(x_adv.detach() + step, x), x)
            bar.set_postfix(objective=f"{value.mean().item():.4f}", refresh=False)
            if self.monitor is not None:
                self.monitor(i, x_adv)
        return x_adv


def gaussian_smooth(t: torch.Tensor, size: int) -> torch.Tensor:
    """Each channel of `N x C x H x W` convolved with a normalised `size x size` Gaussian (`size` odd; standard
    deviation `(size - 1) / 6`, as TI's kernel over +-3 sigma), zero-padded to keep the shape."""
    sigma = max((size - 1) / 6, 1e-6)
    offsets = torch.arange(size, dtype=t.dtype, device=t.device) - (size - 1) / 2
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = t.shape[1]
    t = F.conv2d(t, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), padding=(0, size // 2), groups=channels)
    return F.conv2d(t, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), padding=(size // 2, 0), groups=channels)
