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
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .progress import ProgressBar, progress_bar

logger = logging.getLogger(__name__)

Generators = torch.Generator | Sequence[torch.Generator] | None


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


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Clip `x_adv` into the L-infinity ball of radius `eps` around `x`, then into `bounds`."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(*bounds)


def per_sample_generators(generator: Generators, n: int) -> list[torch.Generator | None]:
    """One generator per sample: a list is taken as it is (its length checked), anything else repeated."""
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for a batch of {n}")
    return generators


def uniform_noise(like: torch.Tensor, low: float, high: float, generator: Generators = None) -> torch.Tensor:
    """Uniform noise shaped like `like`, drawn on each generator's own device and then moved to `like`'s.

    A list of generators gives each sample its own stream, so a batch sees the same noise as single runs
    (the habit of diffusers' `randn_tensor`).
    """
    generators = per_sample_generators(generator, len(like))
    if len(set(map(id, generators))) < len(generators):
        draws = [_rand(like.shape, generators[0], like.dtype)]
    else:
        draws = [_rand((1, *like.shape[1:]), g, like.dtype) for g in generators]
    return (torch.cat(draws).to(like.device) * (high - low) + low)


def _rand(shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


class Attack:
    """Base class of every protection method.

    Images are `N x 3 x H x W` tensors in `[-1, 1]`. Calling the attack returns protected images within `eps`
    (L-infinity, in the same `[-1, 1]` units) of the input and inside the bounds, detached, on the input's device
    and in its dtype; the input is never modified. Models listed by `modules()` are frozen (eval mode, no
    parameter gradients) for the duration of the call and restored afterwards. Internally the perturbation is
    optimised in float32 whatever the input dtype; each model wrapper casts to its own dtype.

    Subclasses implement `perturb(x, generator)`, usually as a loop over `objective` (the value one iteration
    computes and the attack increases) with what `prepare` computed once on the clean images.
    """

    name: str = ""
    summary: str = ""
    models: tuple[str, ...] = ()
    bounds: tuple[float, float] = (-1.0, 1.0)

    def __init__(self, eps: float = 0.03, progress: bool = False) -> None:
        if not 0 < eps <= self.bounds[1] - self.bounds[0]:
            raise ValueError(f"the budget eps must be in (0, {self.bounds[1] - self.bounds[0]}], got {eps}")
        self.eps = eps
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
        return project(x_adv.detach().float(), clean, self.eps, self.bounds).to(x.dtype)

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> Any:
        """What the objective needs from the clean images, computed once (without gradients)."""
        return None

    def objective(self, x_adv: torch.Tensor, reference: Any, i: int) -> torch.Tensor:
        """The per-sample value (shape `N`) that the attack increases at iteration `i`: one iteration's work, which
        `evaluation/benchmark_speed.py` times for every method."""
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
    """

    def __init__(self, eps: float = 0.03, step_size: float = 0.01, num_iters: int = 100,
                 eot: Callable[[torch.Tensor, Generators], torch.Tensor] | None = None, eot_samples: int = 1,
                 momentum: float = 0.0, input_diversity: float = 0.0, diversity_scale: float = 0.9,
                 ti_kernel: int = 0, schedule: str = "linear", progress: bool = False):
        super().__init__(eps=eps, progress=progress)
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

    def value_and_grad(self, x_adv: torch.Tensor, reference: Any, i: int,
                       generators: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective and its gradient at `x_adv`, averaged over the EOT samples (one graph at a time)."""
        samples = self.eot_samples if self.eot is not None else 1
        value, grad = 0, 0
        for _ in range(samples):
            x = x_adv.detach().requires_grad_(True)
            y = self.eot(x, generators) if self.eot is not None else x
            if self.diversity is not None:
                y = self.diversity(y, generators)
            sample = self.objective(y, reference, i)
            value = value + sample.detach()
            grad = grad + torch.autograd.grad(sample.sum(), [x])[0]
        return value / samples, grad

    def direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """The step direction from this iteration's gradient: smoothed (TI), accumulated (momentum), then its sign.
        `state` carries the momentum from one iteration to the next."""
        if self.ti_kernel > 1:
            grad = gaussian_smooth(grad, self.ti_kernel)
        if self.momentum > 0:
            scale = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            grad = state["momentum"] = self.momentum * state.get("momentum", 0) + grad / scale
        return grad.sign()

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        with torch.no_grad():
            reference = self.prepare(x)
        x_adv = project(x + uniform_noise(x, -self.eps, self.eps, generator), x, self.eps, self.bounds)
        active = torch.ones(len(x), 1, 1, 1, dtype=torch.bool, device=x.device)
        generators = per_sample_generators(generator, len(x))
        state: dict = {}
        bar = self.iterations(self.num_iters, desc=self.name)
        for i in bar:
            value, grad = self.value_and_grad(x_adv, reference, i, generators)
            reached = self.reached(reference, i)
            if reached is not None:
                active &= ~reached.view(-1, 1, 1, 1).to(active.device)
                if not active.any():
                    logger.info("%s: every image reached its goal after %d iterations", self.name, i)
                    return x_adv.detach()
            step = self.step_size_at(i) * self.direction(grad, state) * active
            x_adv = project(x_adv.detach() + step, x, self.eps, self.bounds)
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
