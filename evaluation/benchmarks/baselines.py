"""Seconds and peak memory of editshield and PhotoGuard's diffusion attack on full-size models.

    python -m evaluation.benchmarks.baselines [--sizes 512] [--device cuda] [--model_id timbrooks/instruct-pix2pix]

Models: random stand-ins with InstructPix2Pix's architecture (Stable Diffusion 1.5's VAE and CLIP text encoder, a
UNet with 8 input channels; time and memory do not depend on the weights), or a real pipeline with --model_id.
Weights are float16 on CUDA (defend.py's default there) and float32 on a CPU; the perturbation is float32. Each
figure comes from a fresh process: the median seconds of one gradient pass after a warm-up (editshield: one
iteration; the diffusion attack: one generation of --steps denoising steps with the editor's guidance,
back-propagated to the photo), what that makes per iteration (x --grad_reps) and per photo (x iterations), and
the peak memory of the process (the CUDA allocator's peak, or the resident memory on a CPU), weights included.
`--without_checkpointing` adds the diffusion attack with every activation kept (about 40 GB at 512 px on a GPU,
by the official notebook's account: leave it off on small machines).
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Sequence

import torch

import methods
from methods.base import frozen
from methods.diffusion import DiffusionEditor, gradient_checkpointing
from methods.editshield import TRAINING_SCHEDULE
from methods.models import loading
from utils import cpu_generator, pick_device, pick_dtype, run_script

from .results import write_results
from .standins import IP2P_UNET, SD15_TEXT, StandInTokenizer, portrait, sd15_vae
from .timing import PeakMemory, in_fresh_process, median_seconds


def editor(model_id: str | None, device: torch.device, dtype: torch.dtype) -> DiffusionEditor:
    """InstructPix2Pix as the diffusion attack runs it: `model_id` loaded as defend.py loads it (in `dtype`, its
    default on `device`), or stand-ins in `dtype`."""
    if model_id:
        return DiffusionEditor(loading.load_editor("instruct-pix2pix", model_id, device, progress=False))
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = SimpleNamespace(vae=sd15_vae(device, dtype), unet=UNet2DConditionModel(**IP2P_UNET),
                            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=StandInTokenizer(),
                            scheduler=EulerAncestralDiscreteScheduler(**TRAINING_SCHEDULE))
    return DiffusionEditor(parts).to(device=device, dtype=dtype).eval()


def one_pass(method: str, size: int, device_name: str, model_id: str | None, steps: int, checkpointing: bool,
             repeats: int) -> tuple[float, float]:
    """(median seconds of one gradient pass, peak memory in MB) of `method`, in this process."""
    device = torch.device(device_name)
    peak = PeakMemory(device)
    model = editor(model_id, device, pick_dtype("auto", device))
    if method == "editshield":
        attack = methods.create("editshield", autoencoder=model.autoencoder.vae)
    else:
        attack = methods.create("diffusion", editor=model, steps=steps, grad_reps=1)
    x = portrait(size, device)
    with frozen(*attack.modules()), gradient_checkpointing(model.unet, model.autoencoder.vae, enabled=checkpointing):
        with torch.no_grad():
            reference = attack.prepare(x)
        seconds = median_seconds(lambda: attack.value_and_grad(x, reference, 0, [cpu_generator(0)]), device,
                                 repeats)
    return seconds, peak.megabytes()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="photo sides in pixels")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--model_id", help="a real InstructPix2Pix (hub id or folder) instead of the stand-ins")
    parser.add_argument("--steps", type=int, default=4, help="diffusion: denoising steps unrolled")
    parser.add_argument("--grad_reps", type=int, default=10, help="diffusion: generations per iteration")
    parser.add_argument("--num_iters", type=int, default=200, help="diffusion: iterations per photo")
    parser.add_argument("--editshield_iters", type=int, default=100, help="editshield: iterations per photo")
    parser.add_argument("--without_checkpointing", action="store_true",
                        help="also measure the diffusion attack without gradient checkpointing (much more memory)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure, after a warm-up")
    parser.add_argument("--output", help="also write the table, with the machine, date and command, to this markdown "
                                         "file (evaluation/results/baselines.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    runs = [("editshield", True, 1, args.editshield_iters), ("diffusion", True, args.grad_reps, args.num_iters)]
    if args.without_checkpointing:
        runs.append(("diffusion", False, args.grad_reps, args.num_iters))
    lines = [f"Weights {pick_dtype('auto', device)}, {args.model_id or 'random stand-ins of InstructPix2Pix'}.", "",
             "| method | size | one gradient pass (s) | per iteration (s) | per photo (min) | peak memory (GB) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for size in args.sizes:
        for method, checkpointing, passes, iterations in runs:
            seconds, megabytes = in_fresh_process(one_pass, method, size, str(device), args.model_id, args.steps,
                                                  checkpointing, args.repeats)
            label = method if method == "editshield" else (
                f"diffusion, {args.steps} steps, {'with' if checkpointing else 'without'} checkpointing")
            lines.append(f"| {label} | {size} | {seconds:.2f} | {seconds * passes:.2f} ({passes} pass"
                         f"{'es' if passes > 1 else ''}) | {seconds * passes * iterations / 60:.2f} ({iterations} "
                         f"iterations) | {megabytes / 1024:.1f} |")
            print(lines[-1], flush=True)
    if args.output:
        write_results(args.output, "EditShield and PhotoGuard's diffusion attack: seconds and memory",
                      "\n".join(lines), "evaluation.benchmarks.baselines", argv, [device])
    return 0


if __name__ == "__main__":
    run_script(main)
