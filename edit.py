"""Edit one photo with a diffusion editor, the way a malicious user would (or protected, the way its owner would).

    python edit.py --input_path photo.png --prompt "Turn the person's hair pink" [--model instruct-pix2pix]
    python edit.py --input_path me.jpg --prompt "Change the background to a beach" --protect_identity

Writes a PNG of the input's size. With `--protect_identity` (Flux-Guard, `methods/guard.py`) the edit comes out
protected against face recognition, and the unprotected edit is written beside it. `main_edit.py` edits a folder
with many prompts.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.metrics.psnr import psnr
from methods.base import budget_limit
from methods.faces import NoFaceError
from utils import (
    EDITOR_ID_HELP,
    EDITOR_IDS,
    ModelUnavailable,
    UserError,
    cpu_generator,
    derive_seed,
    linf_255,
    load_autoencoder,
    load_face_identity,
    load_image,
    load_perceptual,
    load_pretrained,
    pick_device,
    pick_dtype,
    pil_to_tensor,
    png_output,
    quantize_within,
    read_prompts,
    run_script,
    same_file,
    save_png,
    tensor_to_uint8,
)

logger = logging.getLogger("edit")

#: Identity protection (Flux-Guard): the paper's 5 steps x 10 Adam iterations at lr 0.02 and perceptual weight 0.5,
#: the defenses' budget 0.03 (L-infinity), a face model that downloads (SFace) and the paper's VGG19 feature loss;
#: then 100 PGD steps on the pixels (not in the paper; measured in the README).
GUARD_DEFAULTS = dict(
    fr_model="sface", fr_combine="mean", identity_target=None, guard_budget=0.03, guard_norm="linf", guard_steps=5,
    guard_iterations=10, guard_lr=0.02, guard_refine=100, guard_perceptual="vgg19", guard_perceptual_weight=0.5,
)
#: Every default in one place. 50 denoising steps as in the official scripts (their README says 100, which
#: doubles the cost; the paper's tables come from the scripts).
DEFAULTS = dict(
    model="instruct-pix2pix", model_id=None, vae=None, seed=-1, guidance_scale=7.5, image_guidance_scale=1.5,
    strength=0.5, num_inference_steps=50, prompts=None, device="auto", dtype="auto", attention_slicing=False,
    cpu_offload=False, max_size=1024, overwrite=False,
    protect_identity=False, **GUARD_DEFAULTS,
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
    guard = parser.add_argument_group("identity protection (Flux-Guard; methods/guard.py)")
    guard.add_argument("--protect_identity", action="store_true", default=None,
                       help="protect the edit against face recognition while it is made; the unprotected edit is "
                            "written too")
    guard.add_argument("--fr_model", help="face model(s) the protection works against: facenet, sface, mobilefacenet, "
                                          "mobileface, adaface or an .onnx path; comma-separated for an ensemble")
    guard.add_argument("--fr_combine", choices=["mean", "max"],
                       help="with several --fr_model: lower their mean similarity, or per image the highest")
    guard.add_argument("--identity_target", help="impersonation: make the edit's face match this photo's face "
                                                 "instead of only moving it away from the source's")
    guard.add_argument("--guard_budget", type=float, help="distance allowed between the protected and the clean "
                                                          "edit, in [-1, 1] units: per pixel (0.03 is 3.8/255), or "
                                                          "with --guard_norm l2 the length of the whole change")
    guard.add_argument("--guard_norm", choices=["linf", "l2"],
                       help="measure --guard_budget per pixel (linf) or over the whole edit (l2: 16 at 512 px is "
                            "about 41 dB PSNR)")
    guard.add_argument("--guard_steps", type=int, help="protect during this many last denoising steps")
    guard.add_argument("--guard_iterations", type=int, help="Adam iterations on the latent per protected step")
    guard.add_argument("--guard_lr", type=float, help="Adam learning rate on the latent")
    guard.add_argument("--guard_refine", type=int, help="then this many PGD steps on the edit's pixels, within the "
                                                        "budget (0: the paper's latent optimisation only)")
    guard.add_argument("--guard_perceptual", choices=["vgg19", "lpips", "none"],
                       help="perceptual loss to the clean edit: MSE of VGG19 relu3_4 features (the paper's), "
                            "LPIPS-VGG, or none (the budget alone bounds the change)")
    guard.add_argument("--guard_perceptual_weight", type=float, help="weight of the perceptual loss")
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
    parser.add_argument("--clean_output_path", help="with --protect_identity, where to write the unprotected edit "
                                                    "(default: <output name>_clean.png beside the edit)")
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
    if args.protect_identity:
        if not 0 < args.guard_budget <= budget_limit(args.guard_norm) or args.guard_steps < 1 \
                or args.guard_iterations < 1 or args.guard_lr <= 0 or args.guard_refine < 0 \
                or args.guard_perceptual_weight < 0:
            parser.error("--guard_budget must be in (0, 2] (l2: > 0), --guard_steps and --guard_iterations >= 1, "
                         "--guard_lr > 0, --guard_refine >= 0 and --guard_perceptual_weight >= 0")
    elif args.identity_target:
        parser.error("--identity_target needs --protect_identity")
    else:  # not protecting: the protection's options play no part (and the manifest says so)
        for key in GUARD_DEFAULTS:
            setattr(args, key, None)
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


def _work_images(args: argparse.Namespace, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images at the size they are edited: resized to --max_size if larger."""
    size = images[0].size
    if args.max_size and max(size) > args.max_size:
        scale = args.max_size / max(size)
        return [im.resize((round(size[0] * scale), round(size[1] * scale)), Image.LANCZOS) for im in images]
    return list(images)


def _pipeline_options(args: argparse.Namespace, work: Sequence[Image.Image], prompt: str,
                      seeds: Sequence[int]) -> dict:
    options = dict(prompt=[prompt] * len(work), image=list(work), num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, generator=[cpu_generator(s) for s in seeds])
    if args.model == "instruct-pix2pix":
        options["image_guidance_scale"] = args.image_guidance_scale
    else:
        options["strength"] = args.strength
    return options


def edit_images(pipe, args: argparse.Namespace, images: Sequence[Image.Image], prompt: str,
                seeds: Sequence[int]) -> list[Image.Image]:
    """Edit same-size images with one prompt, each with its own generator; results have the inputs' size."""
    size = images[0].size
    with torch.inference_mode():
        edited = pipe(**_pipeline_options(args, _work_images(args, images), prompt, seeds)).images
    return [im if im.size == size else im.resize(size, Image.LANCZOS) for im in edited]


def load_guard(args: argparse.Namespace, device: torch.device, progress: bool = True):
    """The Flux-Guard optimiser of `--protect_identity` with its face model(s) and perceptual loss, and the
    target photo of `--identity_target` (`1 x 3 x H x W` in `[-1, 1]`, or None)."""
    from methods.guard import IdentityGuard

    face = load_face_identity(args.fr_model, device, combine=args.fr_combine)
    if args.guard_perceptual == "vgg19":
        from methods.perceptual import load_vgg19_features

        try:
            perceptual = load_vgg19_features().to(device)
        except FileNotFoundError as error:
            raise ModelUnavailable(f"{error} (--guard_perceptual lpips or none)") from None
    else:
        perceptual = load_perceptual("vgg" if args.guard_perceptual == "lpips" else "none", device)
    target = None
    if args.identity_target:
        target = pil_to_tensor(load_image(args.identity_target))
        with torch.no_grad():
            if not bool(face.reference(target.to(device)).found.all()):
                raise UserError(f"--identity_target {args.identity_target}: no face found")
    guard = IdentityGuard(face, perceptual, eps=args.guard_budget, steps=args.guard_steps,
                          iterations=args.guard_iterations, lr=args.guard_lr,
                          perceptual_weight=args.guard_perceptual_weight, norm=args.guard_norm,
                          refine=args.guard_refine, progress=progress)
    return guard, target


def protect_edit_images(pipe, guard, args: argparse.Namespace, images: Sequence[Image.Image], prompt: str,
                        seeds: Sequence[int], target: torch.Tensor | None = None
                        ) -> tuple[list[Image.Image], list[Image.Image], list[dict]]:
    """Edit like `edit_images` and protect every edit against face recognition (`methods.guard`).

    Returns the protected edits, the clean edits (exactly what `edit_images` gives) and per image a record: the
    similarity of both to the source face by the guard's face model(s), the steps protected, the last
    optimisation's losses and weights, the L-infinity distance (in 1/255) and PSNR between the two, and seconds.
    The protected edit differs from the clean one by at most the budget after 8-bit rounding, also after resizing
    back from --max_size (the difference is resized, then clipped and rounded again). Raises `NoFaceError` when a
    photo (or the target) shows no face.
    """
    from methods.guard import guarded_edit

    start = time.perf_counter()
    size = images[0].size
    work = _work_images(args, images)
    sources = torch.cat([pil_to_tensor(im) for im in work])
    result = guarded_edit(pipe, guard, sources, target, **_pipeline_options(args, work, prompt, seeds))
    clean8 = [tensor_to_uint8(c) for c in result.clean]
    protected8 = [quantize_within(p, c, guard.eps, guard.norm) for p, c in zip(result.protected, clean8)]
    protected = torch.cat([pil_to_tensor(Image.fromarray(p)) for p in protected8]).to(result.clean.device)
    records = guard.report(result.clean, protected, result.identity)
    cleans, protecteds = [], []
    for i, record in enumerate(records):
        clean, shielded = Image.fromarray(clean8[i]), Image.fromarray(protected8[i])
        if clean.size != size:  # back to the photo's size: the clean edit as edit_images resizes it, plus the change
            clean = clean.resize(size, Image.LANCZOS)
            delta = F.interpolate(protected[i:i + 1].cpu() - result.clean[i:i + 1].cpu(), size=size[::-1],
                                  mode="bilinear", align_corners=False)
            shielded = Image.fromarray(quantize_within(pil_to_tensor(clean) + delta, np.asarray(clean), guard.eps,
                                                       guard.norm))
        a, b = pil_to_tensor(shielded), pil_to_tensor(clean)
        record.update(steps=result.steps, **{k: v[i] for k, v in result.stats.items()},
                      linf_255=linf_255(np.asarray(shielded), np.asarray(clean)),
                      psnr=round(psnr(a, b).item(), 3), seconds=round((time.perf_counter() - start) / len(records), 2))
        cleans.append(clean)
        protecteds.append(shielded)
    return protecteds, cleans, records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    source = Path(args.input_path)
    output = png_output(source, args.output_path, f"edit_{source.stem}.png", "edits are written as PNG")
    clean_output = None
    if args.protect_identity:
        clean_output = png_output(source, args.clean_output_path or str(output.with_name(f"{output.stem}_clean.png")),
                                  "", "edits are written as PNG")
        if same_file(clean_output, output):
            raise UserError("--clean_output_path must differ from --output_path")
    prompts = read_prompts(args.prompts)
    if args.prompt_index is not None and not 0 <= args.prompt_index < len(prompts):
        raise UserError(f"--prompt_index {args.prompt_index} is outside the {len(prompts)} prompts")
    prompt = prompts[args.prompt_index] if args.prompt is None else args.prompt
    key = prompts.index(prompt) if prompt in prompts else prompt
    image = load_image(source)
    outputs = [path for path in (output, clean_output) if path is not None]
    if all(path.exists() for path in outputs) and not args.overwrite:
        print(f"{' and '.join(map(str, outputs))} exist; nothing to do (pass --overwrite to replace them)")
        return 0

    device = pick_device(args.device)
    pipe = load_editor(args, device)
    seed = edit_seed(args.seed, key, source.stem)
    print(f"editing {source} ({image.width}x{image.height}) with {args.model} ({args.model_id}): {prompt!r}")
    if not args.protect_identity:
        edited = edit_images(pipe, args, [image], prompt, [seed])[0]
        save_png(np.asarray(edited.convert("RGB")), output)
        print(f"wrote {output} (run seed {args.seed}, edit seed {seed})")
        return 0
    guard, target = load_guard(args, device)
    mode = f"impersonating {args.identity_target}" if target is not None else "dodging"
    print(f"protecting the identity ({mode}) against {guard.face.name} ({args.fr_combine}): last "
          f"{args.guard_steps} steps x {args.guard_iterations} Adam iterations at lr {args.guard_lr}, then "
          f"{args.guard_refine} steps on the pixels, perceptual {args.guard_perceptual} x "
          f"{args.guard_perceptual_weight}, budget {args.guard_budget} " +
          (f"({args.guard_budget * 127.5:.1f}/255)" if args.guard_norm == "linf" else "(L2)"))
    try:
        protected, clean, records = protect_edit_images(pipe, guard, args, [image], prompt, [seed], target)
    except NoFaceError:
        raise UserError(f"{source}: no face found; --protect_identity protects a face") from None
    save_png(np.asarray(clean[0]), clean_output)
    save_png(np.asarray(protected[0]), output)
    record = records[0]
    similarities = ", ".join(f"{model} {record['similarity_clean'][model]:.3f} -> "
                             f"{record['similarity_protected'][model]:.3f}" for model in record["similarity_clean"])
    print(f"face similarity to the photo, clean -> protected edit: {similarities}; L-inf {record['linf_255']}/255, "
          f"PSNR {record['psnr']:.2f} dB, {record['seconds']:.1f} s")
    print(f"wrote {output} (protected) and {clean_output} (clean), run seed {args.seed}, edit seed {seed}")
    return 0


if __name__ == "__main__":
    run_script(main)
