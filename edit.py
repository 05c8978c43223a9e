"""Edit one photo with a diffusion editor, the way a malicious user would.

    python edit.py --input_path photo.png --prompt "Turn the person's hair pink" [--model instruct-pix2pix]

Writes a PNG of the input's size. `main_edit.py` edits a folder with many prompts.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from utils import (
    EDITOR_ID_HELP,
    EDITOR_IDS,
    UserError,
    cpu_generator,
    derive_seed,
    load_autoencoder,
    load_image,
    load_pretrained,
    pick_device,
    pick_dtype,
    png_output,
    read_prompts,
    run_script,
    save_png,
)

logger = logging.getLogger("edit")

#: Every default in one place. 50 denoising steps as in the official scripts (their README says 100, which
#: doubles the cost; the paper's tables come from the scripts).
DEFAULTS = dict(
    model="instruct-pix2pix", model_id=None, vae=None, seed=-1, guidance_scale=7.5, image_guidance_scale=1.5,
    strength=0.5, num_inference_steps=50, prompts=None, device="auto", dtype="auto", attention_slicing=False,
    cpu_offload=False, max_size=1024, overwrite=False,
)


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by edit.py and main_edit.py."""
    editor = parser.add_argument_group("editor")
    editor.add_argument("--model", choices=list(EDITOR_IDS),
                        help="instruct-pix2pix (instruction editing) or stable-diffusion (img2img with the prompt)")
    editor.add_argument("--model_id", help=EDITOR_ID_HELP)
    editor.add_argument("--vae", help="decode with this autoencoder instead (e.g. madebyollin/taesd for previews)")
    editor.add_argument("--seed", type=int, help="run seed; every edit derives its own from it, the prompt index and "
                                                 "the image name (-1: pick one and print it)")
    editor.add_argument("--guidance_scale", type=float, help="text guidance")
    editor.add_argument("--image_guidance_scale", type=float, help="image guidance (instruct-pix2pix)")
    editor.add_argument("--strength", type=float, help="how much of the image is re-noised (stable-diffusion)")
    editor.add_argument("--num_inference_steps", type=int, help="denoising steps")
    editor.add_argument("--prompts", help="file with one prompt per line (default: the paper's 25 prompts)")
    editor.add_argument("--max_size", type=int, help="edit larger photos at this long side; the result is resized "
                                                     "back to the photo's size (0: never)")
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    hardware.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                          help="model dtype (auto: float16 on CUDA, float32 on CPU)")
    hardware.add_argument("--attention_slicing", action="store_true", default=None,
                          help="compute attention in slices (less GPU memory, a little slower)")
    hardware.add_argument("--cpu_offload", action="store_true", default=None,
                          help="keep models on the CPU and move each to the GPU only while it runs (small GPUs)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True, help="the photo to edit")
    parser.add_argument("--output_path", help="where to write the edit (default: edit_<name>.png beside the input)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the editing instruction")
    which.add_argument("--prompt_index", type=int, help="use prompt i of the prompt list (as main_edit.py does)")
    add_edit_arguments(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(argv)
    if args.num_inference_steps < 1 or not 0 < args.strength <= 1 or args.max_size < 0:
        parser.error("--num_inference_steps must be >= 1, --strength in (0, 1] and --max_size >= 0")
    args.model_id = args.model_id or EDITOR_IDS[args.model]
    if args.seed == -1:
        args.seed = random.randint(0, 2**32 - 1)
        print(f"seed {args.seed} (pass --seed {args.seed} to reproduce or resume)")
    return args


def edit_seed(run_seed: int, prompt_key: int | str, name: str) -> int:
    """The seed of one edit: from the run seed, the prompt's index in the prompt list (or its text if it is not
    in the list) and the image's name without extension."""
    return derive_seed(run_seed, prompt_key, name)


def load_editor(args: argparse.Namespace, device: torch.device, progress: bool = True):
    """The diffusers editing pipeline for `--model`, safety checker off as in the paper."""
    from diffusers import (AutoPipelineForImage2Image, EulerAncestralDiscreteScheduler,
                           StableDiffusionInstructPix2PixPipeline)

    if args.cpu_offload and device.type == "cpu":
        raise UserError("--cpu_offload moves models to a GPU while they run; there is none here")
    dtype = pick_dtype(args.dtype, device)
    pix2pix = args.model == "instruct-pix2pix"
    cls = StableDiffusionInstructPix2PixPipeline if pix2pix else AutoPipelineForImage2Image
    pipe = load_pretrained(cls.from_pretrained, args.model_id, f"the {args.model} editor {args.model_id}",
                           marker="model_index.json", torch_dtype=dtype, safety_checker=None,
                           requires_safety_checker=False)
    if pix2pix:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if args.vae:
        pipe.vae = load_autoencoder(args.vae, args.model_id, device, dtype)
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


def edit_images(pipe, args: argparse.Namespace, images: Sequence[Image.Image], prompt: str,
                seeds: Sequence[int]) -> list[Image.Image]:
    """Edit same-size images with one prompt, each with its own generator; results have the inputs' size."""
    size = images[0].size
    work = list(images)
    if args.max_size and max(size) > args.max_size:
        scale = args.max_size / max(size)
        work = [im.resize((round(size[0] * scale), round(size[1] * scale)), Image.LANCZOS) for im in images]
    options = dict(prompt=[prompt] * len(work), image=work, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, generator=[cpu_generator(s) for s in seeds])
    if args.model == "instruct-pix2pix":
        options["image_guidance_scale"] = args.image_guidance_scale
    else:
        options["strength"] = args.strength
    with torch.inference_mode():
        edited = pipe(**options).images
    return [im if im.size == size else im.resize(size, Image.LANCZOS) for im in edited]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    source = Path(args.input_path)
    output = png_output(source, args.output_path, f"edit_{source.stem}.png", "edits are written as PNG")
    prompts = read_prompts(args.prompts)
    if args.prompt_index is not None and not 0 <= args.prompt_index < len(prompts):
        raise UserError(f"--prompt_index {args.prompt_index} is outside the {len(prompts)} prompts")
    prompt = prompts[args.prompt_index] if args.prompt is None else args.prompt
    key = prompts.index(prompt) if prompt in prompts else prompt
    image = load_image(source)
    if output.exists() and not args.overwrite:
        print(f"{output} exists; nothing to do (pass --overwrite to replace it)")
        return 0

    device = pick_device(args.device)
    pipe = load_editor(args, device)
    seed = edit_seed(args.seed, key, source.stem)
    print(f"editing {source} ({image.width}x{image.height}) with {args.model} ({args.model_id}): {prompt!r}")
    edited = edit_images(pipe, args, [image], prompt, [seed])[0]
    save_png(np.asarray(edited.convert("RGB")), output)
    print(f"wrote {output} (run seed {args.seed}, edit seed {seed})")
    return 0


if __name__ == "__main__":
    run_script(main)
