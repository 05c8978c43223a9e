"""Editing photos as an attacker would, and the owner's own edit protected against face recognition (Flux-Guard):
the edit options with their defaults and checks, the editor and the guard loaded from them, and the edits.

`EditOptions` holds every option of an edit (`resolve_edit` checks a set of them); `load_editor` and `load_guard` load
the editing pipeline and the guard of `--protect_identity` from them; `edit_images`, `protect_edit_images` and
`edit_folder` are what edit.py, main_edit.py, Table 1 and the benchmarks call.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from methods.base import budget_limit
from methods.models import loading
from methods.models.downloads import sha256_of
from methods.models.faces import NoFaceError
from methods.models.loading import EDITOR_ID_HELP, EDITOR_IDS
from methods.progress import progress_bar
from utils import (
    InputError,
    UserError,
    cpu_generator,
    derive_seed,
    list_images,
    load_image,
    loaded_batches,
    pil_to_tensor,
    read_prompts,
    same_file,
    save_png,
    tensor_to_uint8,
)

from .photos import output_names
from .placement import distances, quantize_within
from .runs import BatchRun, check_writable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditOptions:
    """Every option of an edit, with its default. 50 denoising steps as in the official scripts (their README says
    100, which doubles the cost; the paper's tables come from the scripts). Identity protection (Flux-Guard,
    `protect_identity`): the paper's 5 steps x 10 Adam iterations at lr 0.02 and perceptual weight 0.5, the
    defenses' budget 0.03 (L-infinity), a face model that downloads (SFace) and the paper's VGG19 feature loss; then
    100 PGD steps on the pixels (not in the paper; measured in evaluation/results/guard.md). Without
    `protect_identity` the guard's options are None: they play no part (and a manifest says so)."""

    model: str = "instruct-pix2pix"
    model_id: str | None = None
    vae: str | None = None
    seed: int = -1
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    strength: float = 0.5
    num_inference_steps: int = 50
    prompts: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False
    max_size: int = 1024
    overwrite: bool = False
    protect_identity: bool = False
    fr_model: str | None = "sface"
    fr_combine: str | None = "mean"
    identity_target: str | None = None
    guard_budget: float | None = 0.03
    guard_norm: str | None = "linf"
    guard_steps: int | None = 5
    guard_iterations: int | None = 10
    guard_lr: float | None = 0.02
    guard_refine: int | None = 100
    guard_perceptual: str | None = "vgg19"
    guard_perceptual_weight: float | None = 0.5

    def replace(self, **changes: Any) -> EditOptions:
        return dataclasses.replace(self, **changes)


EDIT_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(EditOptions))
#: Every default in one place (the dataclass's), by name.
EDIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EditOptions)}
#: The guard's options, which only `--protect_identity` uses.
GUARD_OPTIONS = ("fr_model", "fr_combine", "identity_target", "guard_budget", "guard_norm", "guard_steps",
                 "guard_iterations", "guard_lr", "guard_refine", "guard_perceptual", "guard_perceptual_weight")


def resolve_edit(**given: Any) -> EditOptions:
    """The options of an edit: `given` (None counts as not given) over the defaults, checked; the run seed -1 stays
    -1 (a script picks one). Raises `UserError` with one line naming what is wrong."""
    unknown = sorted(set(given) - set(EDIT_OPTION_NAMES))
    if unknown:
        raise UserError(f"unknown edit option(s): {', '.join(unknown)}")
    values = {**EDIT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    o = EditOptions(**values)
    if o.num_inference_steps < 1 or not 0 < o.strength <= 1 or o.max_size < 0:
        raise UserError("--num_inference_steps must be >= 1, --strength in (0, 1] and --max_size >= 0")
    o = o.replace(model_id=o.model_id or EDITOR_IDS[o.model])
    if o.protect_identity:
        if not 0 < o.guard_budget <= budget_limit(o.guard_norm) or o.guard_steps < 1 or o.guard_iterations < 1 \
                or o.guard_lr <= 0 or o.guard_refine < 0 or o.guard_perceptual_weight < 0:
            raise UserError("--guard_budget must be in (0, 2] (l2: > 0), --guard_steps and --guard_iterations >= 1, "
                            "--guard_lr > 0, --guard_refine >= 0 and --guard_perceptual_weight >= 0")
        return o
    if o.identity_target:
        raise UserError("--identity_target needs --protect_identity")
    return o.replace(**{key: None for key in GUARD_OPTIONS})


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by edit.py and main_edit.py. Every default is None here: `parse_edit` resolves them."""
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


def parse_edit(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a script's command line: its own arguments, and every edit option resolved and checked, as attributes;
    `.options` holds them as `EditOptions`. Options that cannot run are the parser's error. A run seed of -1 is
    replaced by a random one, printed so that the run can be reproduced."""
    args = parser.parse_args(argv)
    try:
        options = resolve_edit(**{k: getattr(args, k) for k in EDIT_OPTION_NAMES if getattr(args, k, None) is not None})
    except UserError as error:
        parser.error(str(error))
    if options.seed == -1:
        options = options.replace(seed=random.randint(0, 2**32 - 1))
        print(f"seed {options.seed} (pass --seed {options.seed} to reproduce or resume)")
    for key, value in dataclasses.asdict(options).items():
        setattr(args, key, value)
    args.options = options
    return args


def edit_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The edit options named by extra command-line flags (e.g. Table 1's `--edit_args`); raises `UserError` for
    flags that are not edit options."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_edit_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as error:
        raise UserError(f"not valid edit options: {' '.join(argv)} ({error})") from None
    if unknown:
        raise UserError(f"not edit options: {' '.join(unknown)}")
    return {k: getattr(args, k) for k in EDIT_OPTION_NAMES if getattr(args, k, None) is not None}


def edit_seed(run_seed: int, prompt_key: int | str, name: str) -> int:
    """The seed of one edit: from the run seed, the prompt's index in the prompt list (or its text if it is not
    in the list) and the image's name without extension."""
    return derive_seed(run_seed, prompt_key, name)


def load_editor(options: EditOptions, device: torch.device, progress: bool = True):
    """The diffusers editing pipeline of the options (`methods.models.loading.load_editor`)."""
    return loading.load_editor(options.model, options.model_id, device, dtype=options.dtype, vae=options.vae,
                               attention_slicing=options.attention_slicing, cpu_offload=options.cpu_offload,
                               progress=progress)


def work_images(options: EditOptions, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images at the size they are edited: resized to --max_size if larger."""
    size = images[0].size
    if options.max_size and max(size) > options.max_size:
        scale = options.max_size / max(size)
        return [im.resize((round(size[0] * scale), round(size[1] * scale)), Image.LANCZOS) for im in images]
    return list(images)


def pipeline_options(options: EditOptions, work: Sequence[Image.Image], prompt: str, seeds: Sequence[int]) -> dict:
    """The diffusers pipeline's arguments for one batch of same-size work images and one prompt."""
    call = dict(prompt=[prompt] * len(work), image=list(work), num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale, generator=[cpu_generator(s) for s in seeds])
    if options.model == "instruct-pix2pix":
        call["image_guidance_scale"] = options.image_guidance_scale
    else:
        call["strength"] = options.strength
    return call


def edit_images(pipe, options: EditOptions, images: Sequence[Image.Image], prompt: str,
                seeds: Sequence[int]) -> list[Image.Image]:
    """Edit same-size images with one prompt, each with its own generator; results have the inputs' size."""
    size = images[0].size
    with torch.inference_mode():
        edited = pipe(**pipeline_options(options, work_images(options, images), prompt, seeds)).images
    return [im if im.size == size else im.resize(size, Image.LANCZOS) for im in edited]


def load_guard(options: EditOptions, device: torch.device, progress: bool = True):
    """The Flux-Guard optimiser of `--protect_identity` with its face model(s) and perceptual loss, and the
    target photo of `--identity_target` (`1 x 3 x H x W` in `[-1, 1]`, or None)."""
    from methods.guard import IdentityGuard

    face = loading.load_face_identity(options.fr_model, device, combine=options.fr_combine)
    perceptual = loading.load_guard_perceptual(options.guard_perceptual, device)
    target = None
    if options.identity_target:
        target = pil_to_tensor(load_image(options.identity_target))
        with torch.no_grad():
            if not bool(face.reference(target.to(device)).found.all()):
                raise UserError(f"--identity_target {options.identity_target}: no face found")
    guard = IdentityGuard(face, perceptual, eps=options.guard_budget, steps=options.guard_steps,
                          iterations=options.guard_iterations, lr=options.guard_lr,
                          perceptual_weight=options.guard_perceptual_weight, norm=options.guard_norm,
                          refine=options.guard_refine, progress=progress)
    return guard, target


def protect_edit_images(pipe, guard, options: EditOptions, images: Sequence[Image.Image], prompt: str,
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
    work = work_images(options, images)
    sources = torch.cat([pil_to_tensor(im) for im in work])
    result = guarded_edit(pipe, guard, sources, target, **pipeline_options(options, work, prompt, seeds))
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
        change = distances(np.asarray(shielded), np.asarray(clean))
        record.update(steps=result.steps, **{k: v[i] for k, v in result.stats.items()}, linf_255=change["linf_255"],
                      psnr=round(change["psnr"], 3), seconds=round((time.perf_counter() - start) / len(records), 2))
        cleans.append(clean)
        protecteds.append(shielded)
    return protecteds, cleans, records


# ---------------------------------------------------------------------------------------------- a folder

#: Options that decide the edits; a folder made with other values is refused.
EDIT_DEFINING = ("model", "model_id", "vae", "guidance_scale", "image_guidance_scale", "strength",
                 "num_inference_steps", "prompt_list", "max_size", "protect_identity", "fr_model", "fr_combine",
                 "identity_target", "guard_budget", "guard_norm", "guard_steps", "guard_iterations", "guard_lr",
                 "guard_refine", "guard_perceptual", "guard_perceptual_weight")


def prompt_indices(spec: str | None, prompts: Sequence[str]) -> list[int]:
    """The prompt indices of `--prompt_indices` (e.g. "0,13,19"; None: all), checked against the prompt list."""
    if not spec:
        return list(range(len(prompts)))
    try:
        indices = sorted({int(i) for i in spec.split(",")})
    except ValueError:
        raise UserError(f"--prompt_indices takes comma-separated numbers, got {spec!r}") from None
    if indices[0] < 0 or indices[-1] >= len(prompts):
        raise UserError(f"--prompt_indices must lie in 0..{len(prompts) - 1}")
    return indices


def edit_folder(options: EditOptions, src_dir: str | Path, edit_dir: str | Path, indices: str | None = None,
                batch_size: int = 1, clean_edit_dir: str | Path | None = None, loader: Callable = load_editor,
                say: Callable[[str], None] = logger.info) -> int:
    """Edit every photo of `src_dir` with every prompt (or those of `indices`, e.g. "0,13") into
    `edit_dir/seed{S}/prompt{i}/<name>.png`, with a manifest; with `protect_identity` the edits are protected and the
    unprotected ones go to `clean_edit_dir` (default `edit_dir/clean`) in the same layout. A rerun skips finished
    edits; a bad file is recorded and named at the end. `loader(options, device, progress)` gives the pipeline (Table 1
    passes one that loads it once for every folder). `say` reports in words. Returns the exit status."""
    src_dir, folder = Path(src_dir), Path(edit_dir) / f"seed{options.seed}"
    if not src_dir.is_dir():
        raise UserError(f"--src_dir {src_dir} is not a folder")
    if same_file(src_dir, Path(edit_dir)) or same_file(src_dir, folder):
        raise UserError("--edit_dir must not be the source folder")
    clean_folder = None
    if options.protect_identity:
        clean_folder = Path(clean_edit_dir or Path(edit_dir) / "clean") / f"seed{options.seed}"
        if same_file(clean_folder, folder) or same_file(src_dir, clean_folder.parent):
            raise UserError("--clean_edit_dir must differ from --edit_dir and the source folder")
    prompt_list = read_prompts(options.prompts)
    chosen = prompt_indices(indices, prompt_list)
    sources = list_images(src_dir)
    if not sources:
        raise UserError(f"no images in {src_dir}")

    outputs = [folder] + ([clean_folder] if clean_folder else [])
    for output in outputs:
        check_writable(output)
    parameters = {"src_dir": str(src_dir), "edit_dir": str(edit_dir), "prompt_indices": indices,
                  "batch_size": batch_size, "clean_edit_dir": None if clean_edit_dir is None else str(clean_edit_dir),
                  **dataclasses.asdict(options), "prompt_list": prompt_list}
    run = BatchRun(folder, parameters, EDIT_DEFINING, options.overwrite, device=options.device)
    names: dict[Path, str] = {}
    for source, name in output_names(sources).items():
        if name in names.values():
            run.fail(str(source), f"same output name as {next(s for s, n in names.items() if n == name).name}")
        else:
            names[source] = name
    digests = {source: sha256_of(source) for source in names}

    def done(i: int, source: Path) -> bool:
        """An edit is finished once it is written and recorded as made from this very input (by its SHA-256)."""
        key = f"prompt{i}/{names[source]}"
        return all((f / key).exists() for f in outputs) and run.recorded(key, digests[source])

    work = [(i, source) for i in chosen for source in names if options.overwrite or not done(i, source)]
    total = len(chosen) * len(names)
    if run.is_main:
        processes = f" in {run.num_processes} processes" if run.num_processes > 1 else ""
        say(f"{len(names)} images x {len(chosen)} prompts in {folder}: {total - len(work)} edits already done, "
            f"{len(work)} to do{processes}")
    mine = run.mine(work)
    pipe = loader(options, run.device, progress=False) if mine else None
    guard, target = None, None
    if mine and options.protect_identity:
        guard, target = load_guard(options, run.device, progress=False)

    bar = progress_bar(total=len(mine), desc="edits", unit="edit", disable=not run.is_main)
    bad: set[Path] = set()

    def fail(source: Path, error: InputError) -> None:
        bad.add(source)
        run.fail(str(source), str(error))
        bar.update(1)

    for i in chosen:
        bar.update(sum(1 for j, s in mine if j == i and s in bad))
        todo = [s for j, s in mine if j == i and s not in bad]
        for batch in loaded_batches(todo, lambda source: source, batch_size, fail):
            seeds = [edit_seed(options.seed, i, source.stem) for source, _ in batch]
            count = len(batch)
            while batch:
                images = [image for _, image in batch]
                try:
                    if guard is None:
                        edited = edit_images(pipe, options, images, prompt_list[i], seeds)
                    else:
                        edited, cleans, records = protect_edit_images(pipe, guard, options, images, prompt_list[i],
                                                                      seeds, target)
                except NoFaceError as error:  # the others of the batch are edited without it
                    for k in error.missing:
                        bad.add(batch[k][0])
                        run.fail(str(batch[k][0]), "no face found; --protect_identity protects a face")
                    batch = [pair for k, pair in enumerate(batch) if k not in error.missing]
                    seeds = [seed for k, seed in enumerate(seeds) if k not in error.missing]
                    continue
                except RuntimeError as error:  # e.g. out of memory on a large photo
                    logger.exception("editing %s failed", ", ".join(str(s) for s, _ in batch))
                    for source, _ in batch:
                        run.fail(f"prompt{i}/{source.name}", f"{type(error).__name__}: {str(error).splitlines()[0]}")
                else:
                    for k, ((source, _), image) in enumerate(zip(batch, edited)):
                        key = f"prompt{i}/{names[source]}"
                        if guard is not None:
                            save_png(np.asarray(cleans[k]), clean_folder / key)
                        save_png(np.asarray(image.convert("RGB")), folder / key)
                        run.record(key, {"source": str(source), "sha256": digests[source], "seed": seeds[k],
                                         **(records[k] if guard is not None else {})})
                break
            run.save()
            bar.update(count)
    bar.close()

    if run.finish() is None:
        return 0
    edited_now = sum(done(i, s) for i, s in work)
    return run.report(f"edited {edited_now}, already done {total - len(work)} (seed {options.seed})", folder, say)
