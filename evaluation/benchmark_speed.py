"""Speed and memory of protection, measured: seconds per iteration of every method, the levers behind the
defaults, the speed-up over the official code's loop, memory across iterations, and FaceLock end to end.

    python -m evaluation.benchmark_speed [--sizes 256 512] [--repeats 3] [--output speed.md]

Models: the full Stable Diffusion 1.5 VAE architecture with random weights (timing does not depend on the
weights), TAESD and the face models (real weights: FACELOCK_ASSETS offline, else the hub), LPIPS-VGG with a random
backbone. The photo is the bundled astronaut portrait. Per-iteration figures are medians of `--repeats` timed
iterations after a warm-up, weighted over a 100-iteration schedule (FaceLock's terms switch on at 25 % and 35 %).
Peak memory is measured in a fresh process per figure (resident memory on a CPU, the allocator's peak on CUDA).
The last line reads `facelock_sdvae256_speedup_vs_reference: <ratio>`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch
import torch.nn.functional as F
from PIL import Image

import methods
from methods.autoencoder import as_autoencoder
from methods.base import frozen, uniform_noise
from methods.perceptual import LPIPSDistance
from utils import (
    atomic_write,
    cpu_generator,
    load_autoencoder,
    load_face_identity,
    load_image,
    pil_to_tensor,
    run_script,
)

PHOTO = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"
#: diffusers' AutoencoderKL config of Stable Diffusion 1.5 (the VAE InstructPix2Pix uses too).
SD15_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SCHEDULE = 100
AUTOENCODERS = ("SD 1.5 VAE", "TAESD")


# --------------------------------------------------------------------------------------------- measuring

def machine(devices: Sequence[torch.device]) -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, {platform.system()}")
    return text + "".join(f"; {torch.cuda.get_device_name(d)}" for d in devices if d.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakMemory:
    """The peak memory of this process from now on: the CUDA allocator's peak, or on a CPU the resident memory,
    sampled every 5 ms (the kernel's own maximum would include the parent's, as it survives exec)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = psutil.Process().memory_info().rss
        self.running = device.type != "cuda"
        if self.running:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while self.running:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.005)

    def megabytes(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self.running = False
        self.thread.join()
        return self.peak / 2**20


def in_fresh_process(fn: Callable, *args):
    """Run `fn(*args)` in a new process, so that the peak memory it reports is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------------------------------------ models

def photo(size: int, device: torch.device) -> torch.Tensor:
    return pil_to_tensor(load_image(PHOTO).resize((size, size), Image.LANCZOS)).to(device)


def channels_last(model: torch.nn.Module | None) -> torch.nn.Module | None:
    return model.to(memory_format=torch.channels_last) if model is not None else None


def random_lpips(device: torch.device, dtype: torch.dtype = torch.float32) -> LPIPSDistance:
    import lpips

    torch.manual_seed(0)
    return LPIPSDistance(lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)).eval().to(device=device, dtype=dtype)


def autoencoder(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "TAESD":
        return load_autoencoder("madebyollin/taesd", "", device, dtype)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE).eval().to(device=device, dtype=dtype)


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
    return seconds_per_iteration(attack, photo(size, device), repeats), memory.megabytes()


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
    x = photo(size, device)
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


# ------------------------------------------------------------------------------------------------ report

def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes")
    parser.add_argument("--methods", default="encoder,vae,cw,facelock", help="methods to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (after a warm-up)")
    parser.add_argument("--fr_model", default="sface", help="the attack's face model")
    parser.add_argument("--judge", default="mobilefacenet", help="the held-out face model judging protection")
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (the CPU and CUDA where present)")
    parser.add_argument("--output", help="also write the report to this markdown file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    names = [n.strip() for n in args.methods.split(",")]
    lines = [f"Machine: {machine(devices)}", ""]

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    headline = float("nan")
    for device in devices:
        dtype, where = default_dtype(device), device.type.upper()
        emit(f"## {where}: seconds per iteration ({str(dtype).split('.')[1]}, channels_last, LPIPS on)")
        emit()
        rows = []
        for ae_name in AUTOENCODERS:
            for size in args.sizes:
                for name in names:
                    seconds, peak = in_fresh_process(time_method, name, ae_name, size, str(device), args.repeats,
                                                     args.fr_model)
                    rows.append([name, ae_name, size, f"{seconds:.3f}", f"{peak:.0f}"])
                    print(f"  {rows[-1]}", flush=True)
        emit(table(["method", "autoencoder", "size", "s / iteration", "peak memory (MB)"], rows))
        emit()

        face = channels_last(load_face_identity(args.fr_model, device))
        lpips_net = channels_last(random_lpips(device, dtype))
        emit(f"## {where}: components (forward and backward to the input)")
        emit()
        rows = []
        for size in args.sizes:
            x = photo(size, device)
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
        emit(table(["component", "seconds"], rows))
        emit()

        emit(f"## {where}: levers, FaceLock with the SD 1.5 VAE at 256 px (one iteration with every term)")
        emit()
        x = photo(256, device)
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
        emit(table(["setting", "s / iteration"], rows))
        emit()

        emit(f"## {where}: FaceLock with the SD 1.5 VAE at 256 px, against the official loop")
        emit()
        attack = methods.create("facelock", autoencoder=channels_last(autoencoder("SD 1.5 VAE", device, dtype)),
                                face=face, perceptual=lpips_net)
        ours = seconds_per_iteration(attack, x, args.repeats)
        naive = reference_seconds(x, face.to(memory_format=torch.contiguous_format), args.repeats)
        face.to(memory_format=torch.channels_last)
        emit(table(["loop", "s / iteration"], [
            ["official: float32, contiguous, clean face and LPIPS features every iteration, every term always, "
             "graph kept", f"{naive:.3f}"],
            [f"this project: {str(dtype).split('.')[1]}, channels_last, clean references once, a term only when "
             "its weight is not zero, fresh graph per iteration", f"{ours:.3f}"],
        ]))
        emit(f"\nspeed-up: {naive / ours:.2f}x")
        emit()
        if device.type == "cpu":
            headline = naive / ours

        emit(f"## {where}: FaceLock end to end (TAESD + {args.fr_model}, 100 iterations, no LPIPS: --preset small)")
        emit()
        taesd = channels_last(autoencoder("TAESD", device, dtype))
        rows = []
        for size in args.sizes:
            x = photo(size, device)
            attack = methods.create("facelock", autoencoder=taesd, face=face, perceptual=None)
            run = lambda: attack(x, [cpu_generator(0)])  # noqa: E731
            seconds = median_seconds(run, device, max(1, args.repeats - 1))
            rows.append([f"{size}x{size}", f"{seconds:.1f}"])
            print(f"  {rows[-1]}", flush=True)
        emit(table(["photo", "seconds"], rows))
        emit()

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
            unprotected = protection(photo(size, device), photo(size, device), device, face,
                                     load_face_identity(args.judge, device))
        emit(f"Protection reached at {size} px after 100 iterations: FR similarity between the photo and its TAESD "
             "round trip (lower is stronger):")
        emit()
        emit(table(["photo", f"{args.fr_model} (attacked)", f"{args.judge} (held out)"],
                   [["unprotected", *unprotected], ["protected, this project", *runs["project", SCHEDULE][1]],
                    ["protected, official loop", *runs["official", SCHEDULE][1]]]))
        emit()

    if args.output:
        atomic_write(Path(args.output), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print(f"facelock_sdvae256_speedup_vs_reference: {headline:.2f}")
    return 0


if __name__ == "__main__":
    run_script(main)
