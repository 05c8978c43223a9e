"""Speed and memory of protection, measured: seconds per iteration of every method, the levers behind the
defaults, the speed-up over the official code's loop, memory across iterations, FaceLock end to end, the time until
a photo reaches the official schedule's protection, the face region against the whole photo, PNG levels, and (on
CUDA) a folder's throughput by batch size, bucket and compilation.

    python -m evaluation.benchmarks.speed [--sizes 256 512] [--repeats 3] [--sections time,region] \
        [--output evaluation/results/speed.md]

Models: the full Stable Diffusion 1.5 VAE architecture with random weights (timing does not depend on the
weights), TAESD and the face models (real weights: FACELOCK_ASSETS offline, else the hub), LPIPS-VGG with a random
backbone. The photo is the bundled astronaut portrait. Per-iteration figures are medians of `--repeats` timed
iterations after a warm-up, weighted over a 100-iteration schedule (FaceLock's terms switch on at 25 % and 35 %).
Peak memory is measured in a fresh process per figure (resident memory on a CPU, the allocator's peak on CUDA).
The last line reads `facelock_sdvae256_speedup_vs_reference: <ratio>`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import methods
from methods.base import frozen
from methods.models.autoencoder import as_autoencoder
from methods.models.faces import FaceDetector
from methods.models.loading import load_autoencoder, load_face_identity
from methods.models.perceptual import LPIPSDistance
from methods.pipeline.options import resolve
from methods.pipeline.photos import photos_under
from methods.pipeline.placement import face_region, paste, place, work_image
from methods.pipeline.protect import protect_folder
from methods.randomness import uniform_noise
from methods.transforms import eot_transform
from utils import PNG_LEVEL, UserError, cpu_generator, load_image, pil_to_tensor, run_script, save_png

from ..calibration import default_faces
from . import time_to_protection
from .crops import face_crop
from .results import write_results
from .standins import PORTRAIT, portrait, sd15_vae
from .timing import PeakMemory, in_fresh_process, median_seconds, synchronize

SCHEDULE = 100
AUTOENCODERS = ("SD 1.5 VAE", "TAESD")


# ------------------------------------------------------------------------------------------------ models

def channels_last(model: torch.nn.Module | None) -> torch.nn.Module | None:
    return model.to(memory_format=torch.channels_last) if model is not None else None


def random_lpips(device: torch.device, dtype: torch.dtype = torch.float32) -> LPIPSDistance:
    import lpips

    torch.manual_seed(0)
    return LPIPSDistance(lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)).eval().to(device=device, dtype=dtype)


def autoencoder(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "TAESD":
        return load_autoencoder("madebyollin/taesd", "", device, dtype)
    return sd15_vae(device, dtype)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------- timing

def schedule(attack: methods.Attack) -> dict[int, int]:
    """A representative iteration index for each kind of iteration in a 100-iteration run, with its count."""
    if not isinstance(attack, methods.METHODS["facelock"]):
        return {0: SCHEDULE}
    kinds: dict[tuple, list[int]] = {}
    for i in range(SCHEDULE):
        kinds.setdefault(tuple(w > 0 for w in attack.weights_at(i)), []).append(i)
    return {indices[0]: len(indices) for indices in kinds.values()}


def seconds_per_iteration(attack: methods.Attack, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one iteration's work (objective and gradient), averaged over a 100-iteration schedule."""
    attack.num_iters = SCHEDULE
    total = 0.0
    with frozen(*attack.modules()):
        with torch.no_grad():
            reference = attack.prepare(x)
        for i, count in schedule(attack).items():
            def iteration() -> None:
                x_adv = x.clone().requires_grad_(True)
                torch.autograd.grad(attack.objective(x_adv, reference, i).sum(), [x_adv])

            total += count * median_seconds(iteration, x.device, repeats)
    return total / SCHEDULE


def time_method(name: str, ae_name: str, size: int, device: str, repeats: int, fr_model: str) -> tuple[float, float]:
    """(seconds per iteration, peak MB) of one method with the default fast settings; run in a fresh process."""
    device = torch.device(device)
    memory = PeakMemory(device)
    dtype = default_dtype(device)
    attack = methods.create(name, autoencoder=channels_last(autoencoder(ae_name, device, dtype)),
                            face=channels_last(load_face_identity(fr_model, device)),
                            perceptual=channels_last(random_lpips(device, dtype)))
    return seconds_per_iteration(attack, portrait(size, device), repeats), memory.megabytes()


def reference_facelock(x: torch.Tensor, autoencoder, face, perceptual, eps: float, step_size: float, iters: int,
                       generator, on_iteration: Callable[[int], None] | None = None) -> torch.Tensor:
    """FaceLock as the official code's loop runs it: every term at every iteration, the clean face detected and
    embedded again and LPIPS' clean features recomputed each time, and no detach, so the iterates stay chained in
    the autograd graph. Models should be float32 and contiguous, as there."""
    ae = as_autoencoder(autoencoder)
    with frozen(*[m for m in (ae, face, perceptual) if m is not None]):
        with torch.no_grad():
            clean_latent = ae.encode(x).float()
        x_adv = (x + uniform_noise(x, -eps, eps, generator)).clamp(-1, 1).requires_grad_(True)
        for i in range(iters):
            step = step_size - (step_size - step_size / 100) / iters * i
            latent = ae.encode(x_adv).float()
            image = ae.decode(latent).float().clamp(-1, 1)
            loss = -face(image, face.reference(x)) * (1.0 if i >= iters * 0.35 else 0.0)
            loss = loss + 0.2 * F.mse_loss(latent, clean_latent, reduction="none").flatten(1).mean(dim=1)
            if perceptual is not None:
                loss = loss + perceptual(image, perceptual.reference(x)) * (1.0 if i > iters * 0.25 else 0.0)
            grad, = torch.autograd.grad(loss.sum(), [x_adv])
            x_adv = x_adv + grad.detach().sign() * step
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
            x_adv.data = x_adv.data.clamp(-1, 1)
            if on_iteration is not None:
                on_iteration(i)
    return x_adv.detach()


def reference_seconds(x: torch.Tensor, face, repeats: int) -> float:
    """Median seconds of the official loop's iterations with the SD 1.5 VAE (each iteration does the same work)."""
    device = x.device
    stamps = []
    reference_facelock(x, autoencoder("SD 1.5 VAE", device, torch.float32), face, random_lpips(device), 0.03, 0.01,
                       repeats + 1, cpu_generator(0),
                       on_iteration=lambda i: (synchronize(device), stamps.append(time.perf_counter())))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def facelock_run(loop: str, size: int, iters: int, device: str, fr_model: str, judge: str) -> tuple[float, list[str]]:
    """(peak MB, protection) of FaceLock with TAESD and no LPIPS, this project's loop or the official one; run in a
    fresh process. Protection: FR similarity of the TAESD round trip to the photo, by the attacked and the held-out
    face model."""
    device = torch.device(device)
    memory = PeakMemory(device)
    x = portrait(size, device)
    if loop == "official":
        face = load_face_identity(fr_model, device)
        protected = reference_facelock(x, autoencoder("TAESD", device, torch.float32), face, None, 0.03, 0.01, iters,
                                       [cpu_generator(0)])
    else:
        face = channels_last(load_face_identity(fr_model, device))
        taesd = channels_last(autoencoder("TAESD", device, default_dtype(device)))
        protected = methods.create("facelock", autoencoder=taesd, face=face, perceptual=None,
                                   num_iters=iters)(x, [cpu_generator(0)])
    peak = memory.megabytes()
    return peak, protection(protected, x, device, face, load_face_identity(judge, device))


@torch.no_grad()
def protection(protected: torch.Tensor, x: torch.Tensor, device: torch.device, face, judge) -> list[str]:
    round_trip = as_autoencoder(autoencoder("TAESD", device, torch.float32))(protected).float().clamp(-1, 1)
    return [f"{model(round_trip, model.reference(x)).item():.3f}" for model in (face, judge)]


# ---------------------------------------------------------------------------------------------- sections

def per_iteration(args: argparse.Namespace, names: Sequence[str], device: torch.device) -> list[list]:
    rows = []
    for ae_name in AUTOENCODERS:
        for size in args.sizes:
            for name in names:
                seconds, peak = in_fresh_process(time_method, name, ae_name, size, str(device), args.repeats,
                                                 args.fr_model)
                rows.append([name, ae_name, size, f"{seconds:.3f}", f"{peak:.0f}"])
                print(f"  {rows[-1]}", flush=True)
    return rows


def components(args: argparse.Namespace, device: torch.device, face, lpips_net) -> list[list]:
    rows = []
    for size in args.sizes:
        x = portrait(size, device)
        rows.append([f"face detection (MTCNN), {size} px photo",
                     f"{median_seconds(lambda: face.reference(x), device, args.repeats):.3f}"])
        with frozen(face, lpips_net):
            with torch.no_grad():
                faces, clean = face.reference(x), lpips_net.reference(x)
            for label, fn in ((f"face crop + {args.fr_model}, {size} px photo", lambda y: face(y, faces)),
                              (f"LPIPS-VGG, {size} px", lambda y: lpips_net(y, clean))):
                def run(fn=fn) -> None:
                    y = x.clone().requires_grad_(True)
                    torch.autograd.grad(fn(y).sum(), [y])

                rows.append([label, f"{median_seconds(run, device, args.repeats):.3f}"])
    return rows


def levers(args: argparse.Namespace, device: torch.device, face, x: torch.Tensor) -> list[list]:
    settings = [("float32, contiguous", torch.float32, False), ("float32, channels_last", torch.float32, True),
                ("bfloat16, channels_last", torch.bfloat16, True)]
    if device.type == "cuda":
        settings.append(("float16, channels_last", torch.float16, True))
    rows = []
    for label, lever_dtype, last in settings:
        models = [autoencoder("SD 1.5 VAE", device, lever_dtype), random_lpips(device, lever_dtype)]
        if last:
            models = [channels_last(m) for m in models]
        attack = methods.create("facelock", autoencoder=models[0], face=face, perceptual=models[1])
        with frozen(*attack.modules()):
            with torch.no_grad():
                clean = attack.prepare(x)

            def full_iteration() -> None:
                x_adv = x.clone().requires_grad_(True)
                torch.autograd.grad(attack.objective(x_adv, clean, SCHEDULE - 1).sum(), [x_adv])

            rows.append([label, f"{median_seconds(full_iteration, device, args.repeats):.3f}"])
        print(f"  {rows[-1]}", flush=True)
    return rows


def against_reference(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, face, lpips_net,
                      x: torch.Tensor) -> tuple[float, float]:
    """(this project's, the official loop's) seconds per iteration of FaceLock with the SD 1.5 VAE."""
    attack = methods.create("facelock", autoencoder=channels_last(autoencoder("SD 1.5 VAE", device, dtype)),
                            face=face, perceptual=lpips_net)
    ours = seconds_per_iteration(attack, x, args.repeats)
    naive = reference_seconds(x, face.to(memory_format=torch.contiguous_format), args.repeats)
    face.to(memory_format=torch.channels_last)
    return ours, naive


def end_to_end(args: argparse.Namespace, device: torch.device, face, taesd) -> list[list]:
    rows = []
    for size in args.sizes:
        x = portrait(size, device)
        attack = methods.create("facelock", autoencoder=taesd, face=face, perceptual=None)
        run = lambda: attack(x, [cpu_generator(0)])  # noqa: E731
        seconds = median_seconds(run, device, max(1, args.repeats - 1))
        rows.append([f"{size}x{size}", f"{seconds:.1f}"])
        print(f"  {rows[-1]}", flush=True)
    return rows


#: The levers for photos that are shared and for face models never attacked, each on top of `--preset small`'s
#: FaceLock (TAESD, the face model, input diversity 0.5, no LPIPS term).
SHARING_LEVERS = {"--preset small (input diversity 0.5)": {}, "+ --eot share": {"eot": "share"},
                  "+ --chroma 0.3": {"chroma": 0.3}, "+ --smooth_perturbation 3": {"smooth_perturbation": 3},
                  "+ --dct_keep 4": {"dct_keep": 4},
                  "+ --flat_budget 0.3": {"flat_budget": 0.3}, "+ --surrogate_noise 0.05": {"surrogate_noise": 0.05},
                  "+ --landmark_jitter 3": {"landmark_jitter": 3.0}, "+ --antialias": {"antialias": True},
                  "+ --feature_weight 1": {"feature_weight": 1.0}}
#: Iterations each lever is timed over (the preset's schedule shrunk: the face term joins after 35 % of them).
LEVER_ITERATIONS = 20


def sharing_levers(args: argparse.Namespace, device: torch.device, face, taesd, x: torch.Tensor) -> list[list]:
    """Seconds per iteration of `--preset small`'s FaceLock with each lever of `SHARING_LEVERS`, whole attacks."""
    rows, base = [], None
    for label, extra in SHARING_LEVERS.items():
        if "eot" in extra:
            extra = {**extra, "eot": eot_transform([extra["eot"]])}
        attack = methods.create("facelock", autoencoder=taesd, face=face, perceptual=None, input_diversity=0.5,
                                num_iters=LEVER_ITERATIONS, **extra)
        seconds = median_seconds(lambda: attack(x, [cpu_generator(0)]), device, max(1, args.repeats - 1))
        per_iteration = seconds / LEVER_ITERATIONS
        base = base or per_iteration
        rows.append([label, f"{per_iteration:.3f}", f"{per_iteration / base:.2f}x"])
        print(f"  {rows[-1]}", flush=True)
    return rows


def memory_and_protection(args: argparse.Namespace, device: torch.device, face, emit: Callable[[str], None]) -> None:
    size = min(args.sizes)
    runs = {(loop, n): in_fresh_process(facelock_run, loop, size, n, str(device), args.fr_model, args.judge)
            for loop in ("project", "official") for n in (10, SCHEDULE)}
    emit(f"Peak memory of a process protecting one {size} px photo (MB), by number of iterations:")
    emit()
    emit(table(["loop", "10 iterations", "100 iterations", "ratio"], [
        [loop, f"{runs[loop, 10][0]:.0f}", f"{runs[loop, SCHEDULE][0]:.0f}",
         f"{runs[loop, SCHEDULE][0] / runs[loop, 10][0]:.2f}"] for loop in ("project", "official")]))
    emit()
    with torch.no_grad():
        unprotected = protection(portrait(size, device), portrait(size, device), device, face,
                                 load_face_identity(args.judge, device))
    emit(f"Protection reached at {size} px after 100 iterations: FR similarity between the photo and its TAESD "
         "round trip (lower is stronger):")
    emit()
    emit(table(["photo", f"{args.fr_model} (attacked)", f"{args.judge} (held out)"],
               [["unprotected", *unprotected], ["protected, this project", *runs["project", SCHEDULE][1]],
                ["protected, official loop", *runs["official", SCHEDULE][1]]]))
    emit()


def face_photos(args: argparse.Namespace, count: int) -> list[tuple[str, Image.Image]]:
    """The first `count` photos of `--faces` (default FACELOCK_ASSETS/faces), by path."""
    folder = Path(args.faces) if args.faces else default_faces()
    return [(f"{p.parent.name}/{p.stem}", load_image(p)) for p in photos_under(folder)[:count]]


def time_to_protect(args: argparse.Namespace, device: torch.device, face, taesd, emit: Callable[[str], None]
                    ) -> None:
    judge = load_face_identity(args.judge, device)
    detector = FaceDetector()
    photos = [pil_to_tensor(face_crop(image, 256, detector)).to(device) for _, image in face_photos(args, args.photos)]
    build = lambda **options: methods.create("facelock", autoencoder=taesd, face=face, perceptual=None,  # noqa: E731
                                             **options)
    curves = time_to_protection.run(photos, build, taesd, face, judge, seeds=range(len(photos)))
    emit(f"## {args_device(device)}: time to protection (FaceLock, TAESD + {args.fr_model}, 256 px face crops of "
         f"{len(photos)} photos)")
    emit()
    emit(f"Seconds until the TAESD round trip's similarity to the photo, by {args.fr_model} (attacked) and "
         f"{args.judge} (held out), is at or below what the official 100-iteration schedule reaches (medians over "
         "photos; ratio: the official schedule's 100 iterations over the variant's time):")
    emit()
    emit(table(["loop", "photos reaching it", "iterations", "seconds", "speed-up"], time_to_protection.summary(curves)))
    emit()
    emit(f"Protection against time: mean similarity {args.judge} (held out) / {args.fr_model} (attacked) after that "
         "many iterations (mean seconds):")
    emit()
    points = (10, 20, 40, 60, 80, 100)
    emit(table(["loop", *map(str, points)], time_to_protection.table_of_curves(curves, points)))
    emit()


@torch.no_grad()
def round_trip_similarity(ae, out: torch.Tensor, clean: torch.Tensor, models) -> list[float]:
    round_trip = ae(out).float().clamp(-1, 1)
    return [model(round_trip, model.reference(clean)).item() for model in models]


def face_square(args: argparse.Namespace, device: torch.device, face, taesd, emit: Callable[[str], None]) -> None:
    """FaceLock on whole portraits (512 px long side) against FaceLock on the square around the face, judged on the
    round trip of the whole photo."""
    judge, ae, rows, pairs = load_face_identity(args.judge, device), as_autoencoder(taesd), [], []
    for name, image in face_photos(args, args.photos):
        scale = min(1.0, 512 / max(image.size))
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        clean = pil_to_tensor(image).to(device)
        cells, values = [name, f"{image.width}x{image.height}"], []
        for box in (None, face_region(image, face.detector)):
            where = place(image.size, box)
            x = work_image(image, where).to(device)
            attack = methods.create("facelock", autoencoder=taesd, face=face, perceptual=None, allow_no_face=True)
            start = time.perf_counter()
            out, _ = paste(image, where, attack(x, [cpu_generator(0)])[0] - x[0], attack.eps)
            seconds = time.perf_counter() - start
            held, white = round_trip_similarity(ae, pil_to_tensor(Image.fromarray(out)).to(device), clean,
                                                (judge, face))
            values.append(held)
            cells += [f"{where.work[0]}x{where.work[1]}", f"{held:.3f}", f"{white:.3f}", f"{seconds:.0f}"]
        unprotected, _ = round_trip_similarity(ae, clean, clean, (judge, face))
        rows.append(cells + [f"{unprotected:.3f}"])
        pairs.append(values[1] - values[0])
        print(f"  {rows[-1]}", flush=True)
    emit(f"## {args_device(device)}: FaceLock on the whole portrait or on the square around the face (TAESD + "
         f"{args.fr_model}, 100 iterations), judged on the whole photo's TAESD round trip")
    emit()
    emit(table(["photo", "size", "whole: attacked", f"{args.judge} (held out)", f"{args.fr_model}", "s",
                "face square: attacked", f"{args.judge} (held out)", f"{args.fr_model}", "s",
                f"unprotected {args.judge}"], rows))
    spread = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")
    emit(f"\nheld-out similarity, face square minus whole photo: {statistics.mean(pairs):+.3f} "
         f"(standard error {spread:.3f}, {len(pairs)} photos)")
    emit()


#: The throughput section's folder: this many photos, the same for every setting, compared across batch sizes.
THROUGHPUT_PHOTOS = 8
#: The throughput section's settings: label, batch size and options over the paper's configuration.
THROUGHPUT = (("batch 1", 1, {}),
              ("batch 8", 8, {}),
              ("batch 8, compile", 8, {"compile": True}),
              ("batch 8, bfloat16", 8, {"dtype": "bfloat16"}),
              ("batch 1, deterministic", 1, {"deterministic": True}),
              ("batch 8, deterministic", 8, {"deterministic": True}))


def throughput(args: argparse.Namespace, device: torch.device, emit: Callable[[str], None]) -> None:
    """A folder of photos of mixed sizes (512, 480, 448 px, one 64-pixel bucket) in the paper's
    configuration (SD 1.5 VAE stand-in, LPIPS-VGG, the face model), 100 iterations, by batch size, compilation,
    dtype and deterministic kernels (`THROUGHPUT`): seconds per photo end to end, and how far the outputs of the
    same photos differ between batch 1 and batch 8."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        base, vae, photos = load_image(PORTRAIT), Path(folder) / "vae", Path(folder) / "photos"
        autoencoder("SD 1.5 VAE", torch.device("cpu"), torch.float32).save_pretrained(vae)
        photos.mkdir()
        for k in range(THROUGHPUT_PHOTOS):
            side = (512, 480, 448)[k % 3]
            save_png(np.asarray(base.resize((side, side), Image.LANCZOS)), photos / f"p{k:02d}.png")
        rows, outputs, differences = [], {}, []
        for label, batch_size, extra in THROUGHPUT:
            out = outputs[label] = Path(folder) / label.replace(" ", "_").replace(",", "") / "budget_0.03"
            start = time.perf_counter()
            options = resolve("facelock", vae=str(vae), fr_model=args.fr_model, lpips="vgg", device=str(device),
                              max_size=0, bucket=64, **extra)
            protect_folder(options, photos, out.parent, batch_size=batch_size, say=print)
            rows.append([label, f"{(time.perf_counter() - start) / THROUGHPUT_PHOTOS:.2f}"])
            print(f"  {rows[-1]}", flush=True)
            pair = label.replace("batch 8", "batch 1")
            if pair != label and pair in outputs:
                differences.append([f"{pair} / {label}", *pixel_agreement(outputs[pair], out)])
                print(f"  {differences[-1]}", flush=True)
    emit(f"## {args_device(device)}: a folder of {THROUGHPUT_PHOTOS} photos (512, 480 and 448 px, bucket 64), "
         "FaceLock in the paper's configuration (SD 1.5 VAE, LPIPS-VGG), 100 iterations, as main_defend.py runs it")
    emit()
    emit(table(["setting", "seconds per photo (end to end)"], rows))
    emit()
    emit("The same photos protected alone and in batches of 8:")
    emit()
    emit(table(["runs", "largest difference (/255)", "pixels equal"], differences))
    emit()


def pixel_agreement(first: Path, second: Path) -> list[str]:
    """The largest per-pixel difference (/255) and the fraction of equal values between two folders' PNGs."""
    worst, equal, total = 0, 0, 0
    for path in sorted(first.glob("*.png")):
        a = np.asarray(Image.open(path)).astype(np.int16)
        b = np.asarray(Image.open(second / path.name)).astype(np.int16)
        worst, equal, total = max(worst, int(np.abs(a - b).max())), equal + int((a == b).sum()), total + a.size
    return [str(worst), f"{equal / max(total, 1):.2%}"]


def png_levels(emit: Callable[[str], None]) -> None:
    """Seconds and megabytes of a protected 4-megapixel photo written as PNG at each zlib level."""
    import io

    base = np.asarray(load_image(PORTRAIT).resize((2048, 2048), Image.LANCZOS)).astype(np.int16)
    noise = np.random.default_rng(0).integers(-3, 4, base.shape)
    protected = np.clip(base + noise, 0, 255).astype(np.uint8)
    rows = []
    for level in (1, 3, 6, 9):
        def write(level=level) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(protected).save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()

        seconds = median_seconds(write, torch.device("cpu"), 3)
        rows.append([str(level) + (" (default)" if level == PNG_LEVEL else ""), f"{seconds:.2f}",
                     f"{len(write()) / 1e6:.1f}"])
    emit("## PNG: a protected 2048 x 2048 photo written at each zlib level")
    emit()
    emit(table(["level", "seconds", "MB"], rows))
    emit()


def args_device(device: torch.device) -> str:
    return device.type.upper()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ------------------------------------------------------------------------------------------ the sections

@dataclass
class Bench:
    """What every section measures with: the options, one device, and the models, each loaded when first used."""

    args: argparse.Namespace
    device: torch.device
    headline: float = field(default=float("nan"))

    @property
    def dtype(self) -> torch.dtype:
        return default_dtype(self.device)

    @property
    def where(self) -> str:
        return args_device(self.device)

    @cached_property
    def face(self):
        return channels_last(load_face_identity(self.args.fr_model, self.device))

    @cached_property
    def lpips_net(self) -> LPIPSDistance:
        return channels_last(random_lpips(self.device, self.dtype))

    @cached_property
    def taesd(self) -> torch.nn.Module:
        return channels_last(autoencoder("TAESD", self.device, self.dtype))


Emit = Callable[[str], None]


def iteration_section(b: Bench, emit: Emit) -> None:
    emit(f"## {b.where}: seconds per iteration ({str(b.dtype).split('.')[1]}, channels_last, LPIPS on)")
    emit()
    names = [n.strip() for n in b.args.methods.split(",")]
    emit(table(["method", "autoencoder", "size", "s / iteration", "peak memory (MB)"],
               per_iteration(b.args, names, b.device)))
    emit()


def components_section(b: Bench, emit: Emit) -> None:
    emit(f"## {b.where}: components (forward and backward to the input)")
    emit()
    emit(table(["component", "seconds"], components(b.args, b.device, b.face, b.lpips_net)))
    emit()


def levers_section(b: Bench, emit: Emit) -> None:
    emit(f"## {b.where}: levers, FaceLock with the SD 1.5 VAE at 256 px (one iteration with every term)")
    emit()
    emit(table(["setting", "s / iteration"], levers(b.args, b.device, b.face, portrait(256, b.device))))
    emit()


def sharing_section(b: Bench, emit: Emit) -> None:
    size = max(b.args.sizes)
    emit(f"## {b.where}: what each lever for shared photos and unseen face models costs (FaceLock with TAESD + "
         f"{b.args.fr_model}, the bundled portrait at {size} px, {LEVER_ITERATIONS} iterations)")
    emit()
    emit(table(["levers", "s / iteration", "against the preset"],
               sharing_levers(b.args, b.device, b.face, b.taesd, portrait(size, b.device))))
    emit()


def reference_section(b: Bench, emit: Emit) -> None:
    emit(f"## {b.where}: FaceLock with the SD 1.5 VAE at 256 px, against the official loop")
    emit()
    ours, naive = against_reference(b.args, b.device, b.dtype, b.face, b.lpips_net, portrait(256, b.device))
    emit(table(["loop", "s / iteration"], [
        ["official: float32, contiguous, clean face and LPIPS features every iteration, every term always, "
         "graph kept", f"{naive:.3f}"],
        [f"this project: {str(b.dtype).split('.')[1]}, channels_last, clean references once, a term only when "
         "its weight is not zero, fresh graph per iteration", f"{ours:.3f}"],
    ]))
    emit(f"\nspeed-up: {naive / ours:.2f}x")
    emit()
    if b.device.type == "cpu":
        b.headline = naive / ours


def end_to_end_section(b: Bench, emit: Emit) -> None:
    emit(f"## {b.where}: FaceLock end to end (TAESD + {b.args.fr_model}, 100 iterations, no LPIPS: the models "
         "of --preset small, plain sign steps, the whole photo)")
    emit()
    emit(table(["photo", "seconds"], end_to_end(b.args, b.device, b.face, b.taesd)))
    emit()


@dataclass(frozen=True)
class Section:
    """One section of the benchmark: `run(bench, emit)` on each device (or once, for a measure of no device), on
    CUDA only where `cuda_only`."""

    run: Callable[[Bench, Emit], None]
    per_device: bool = True
    cuda_only: bool = False


#: What the benchmark measures, in order; `--sections` picks a subset.
SECTIONS: dict[str, Section] = {
    "iteration": Section(iteration_section),
    "components": Section(components_section),
    "levers": Section(levers_section),
    "sharing": Section(sharing_section),
    "reference": Section(reference_section),
    "end_to_end": Section(end_to_end_section),
    "memory": Section(lambda b, emit: memory_and_protection(b.args, b.device, b.face, emit)),
    "time": Section(lambda b, emit: time_to_protect(b.args, b.device, b.face, b.taesd, emit)),
    "region": Section(lambda b, emit: face_square(b.args, b.device, b.face, b.taesd, emit)),
    "png": Section(lambda b, emit: png_levels(emit), per_device=False),
    "throughput": Section(lambda b, emit: throughput(b.args, b.device, emit), cuda_only=True),
}


# ------------------------------------------------------------------------------------------------ report

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes")
    parser.add_argument("--methods", default="encoder,vae,cw,facelock", help="methods to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (after a warm-up)")
    parser.add_argument("--fr_model", default="sface", help="the attack's face model")
    parser.add_argument("--judge", default="mobilefacenet", help="the held-out face model judging protection")
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (the CPU and CUDA where present)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--faces", help="face photos for the time, region and throughput sections "
                                        "(default: $FACELOCK_ASSETS/faces)")
    parser.add_argument("--photos", type=int, default=5, help="photos measured by the time and region sections")
    parser.add_argument("--output", help="also write the report, with the machine, date and command, to this "
                                         "markdown file (e.g. evaluation/results/speed.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    chosen = [n for n in (n.strip() for n in args.sections.split(",")) if n]
    if set(chosen) - set(SECTIONS):
        raise UserError(f"--sections takes a subset of {','.join(SECTIONS)}")
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    headline = float("nan")
    for device in devices:
        bench = Bench(args, device)
        for name, section in SECTIONS.items():
            if name in chosen and section.per_device and (device.type == "cuda" or not section.cuda_only):
                section.run(bench, emit)
        headline = headline if math.isnan(bench.headline) else bench.headline
    for name, section in SECTIONS.items():
        if name in chosen and not section.per_device:
            section.run(Bench(args, devices[0]), emit)

    if args.output:
        write_results(Path(args.output), "Speed and memory of protection", "\n".join(lines),
                      "evaluation.benchmarks.speed", argv, devices)
    print(f"facelock_sdvae256_speedup_vs_reference: {headline:.2f}")
    return 0


if __name__ == "__main__":
    run_script(main)
