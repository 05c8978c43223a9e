"""Time to protection: how long an attack takes to reach the protection of the official 100-iteration schedule.

For each photo, FaceLock runs 100 iterations with the official schedule (sign steps, step decaying linearly) and with
each variant (momentum, a cosine step schedule, both); every few iterations the protection so far is measured as
the face-recognition similarity between the photo and the autoencoder round trip of the current iterate, by the
attacked face model and by a held-out one (the clock is stopped while it is measured). A variant has reached the
protection at the first iterate whose two similarities are both at or below the official schedule's final ones;
the time it took is what early stopping (`--target_fr`) would spend. `evaluation/benchmarks/speed.py` prints the
tables.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

import methods
from methods.models.autoencoder import as_autoencoder

#: Variants of the PGD loop compared with the official one (options of `methods.PGDAttack`).
VARIANTS = {
    "official": {},
    "momentum": {"momentum": 1.0},
    "cosine": {"schedule": "cosine"},
    "momentum+cosine": {"momentum": 1.0, "schedule": "cosine"},
}


@dataclass
class Curve:
    """Protection against time for one photo and one variant: per measured iterate, its index (1-based count of
    steps taken), the attack's seconds so far and the attacked and held-out similarities."""

    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    attacked: list[float] = field(default_factory=list)
    held_out: list[float] = field(default_factory=list)

    def reached(self, attacked: float, held_out: float) -> tuple[int, float] | None:
        """(iterations, seconds) at the first iterate at or below both similarities; None if never."""
        for i, s, a, h in zip(self.iterations, self.seconds, self.attacked, self.held_out):
            if a <= attacked + 1e-6 and h <= held_out + 1e-6:
                return i, s
        return None


def measure_curve(attack: methods.PGDAttack, x: torch.Tensor, generator: torch.Generator, autoencoder,
                  attacked, held_out, every: int = 5) -> Curve:
    """Run `attack` on one photo `x`, measuring the protection of every `every`-th iterate (and the last)."""
    ae = as_autoencoder(autoencoder)
    with torch.no_grad():
        references = (attacked.reference(x), held_out.reference(x))
    curve, clock = Curve(), {"start": 0.0, "paused": 0.0}

    def monitor(i: int, x_adv: torch.Tensor) -> None:
        if (i + 1) % every and i + 1 != attack.num_iters:
            return
        paused = time.perf_counter()
        with torch.no_grad():
            round_trip = ae(x_adv).float().clamp(-1, 1)
            values = [model(round_trip, reference).item() for model, reference in zip((attacked, held_out),
                                                                                     references)]
        curve.iterations.append(i + 1)
        curve.seconds.append(paused - clock["start"] - clock["paused"])
        curve.attacked.append(values[0])
        curve.held_out.append(values[1])
        clock["paused"] += time.perf_counter() - paused

    attack.monitor = monitor
    clock["start"] = time.perf_counter()
    try:
        attack(x, [generator])
    finally:
        attack.monitor = None
    return curve


def run(photos: Sequence[torch.Tensor], build, autoencoder, attacked, held_out, seeds: Sequence[int],
        variants: Sequence[str] = tuple(VARIANTS), every: int = 5) -> dict[str, list[Curve]]:
    """Curves of every variant for every photo; `build(**options)` makes the FaceLock attack of a variant."""
    curves: dict[str, list[Curve]] = {v: [] for v in variants}
    for x, seed in zip(photos, seeds):
        for variant in variants:
            attack = build(**VARIANTS[variant])
            curves[variant].append(measure_curve(attack, x, torch.Generator().manual_seed(seed), autoencoder,
                                                 attacked, held_out, every))
    return curves


def summary(curves: dict[str, list[Curve]]) -> list[list[str]]:
    """Per variant: photos reaching the official protection, median iterations and seconds to it, and the ratio of
    the official schedule's median seconds (100 iterations) to the variant's."""
    official = curves["official"]
    targets = [(c.attacked[-1], c.held_out[-1]) for c in official]
    baseline = statistics.median(c.seconds[-1] for c in official)
    rows = []
    for variant, per_photo in curves.items():
        hits = [c.reached(*target) for c, target in zip(per_photo, targets)]
        reached = [h for h in hits if h is not None]
        seconds = statistics.median(s for _, s in reached) if reached else math.nan
        rows.append([variant, f"{len(reached)}/{len(hits)}",
                     f"{statistics.median(i for i, _ in reached):.0f}" if reached else "n/a",
                     f"{seconds:.1f}" if reached else "n/a",
                     f"{baseline / seconds:.2f}x" if reached else "n/a"])
    return rows


def table_of_curves(curves: dict[str, list[Curve]], points: Sequence[int] = (10, 20, 40, 60, 80, 100)
                    ) -> list[list[str]]:
    """Mean held-out and attacked similarity (and mean seconds) after given numbers of iterations, per variant."""
    rows = []
    for variant, per_photo in curves.items():
        cells = [variant]
        for point in points:
            at = [c.iterations.index(point) for c in per_photo if point in c.iterations]
            if not at:
                cells.append("n/a")
                continue
            mean = lambda values: sum(values) / len(values)  # noqa: E731
            held = mean([c.held_out[k] for c, k in zip(per_photo, at)])
            white = mean([c.attacked[k] for c, k in zip(per_photo, at)])
            seconds = mean([c.seconds[k] for c, k in zip(per_photo, at)])
            cells.append(f"{held:.3f} / {white:.3f} ({seconds:.0f} s)")
        rows.append(cells)
    return rows
