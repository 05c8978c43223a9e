"""Protect one face photo against diffusion editing.

    python defend.py --input_path photo.jpg --defend_method facelock [--output_path photo_protected.png]
    python defend.py --web      # a page in the browser instead (evaluation/web.py)

Writes a lossless PNG of the input's size that differs from it by at most the budget (after 8-bit rounding).
`main_defend.py` does the same for a folder. Run with `--help` for the methods and every option.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

import methods
from evaluation.metrics.psnr import psnr
from evaluation.walker import photos_under
from methods.base import L2_STEP
from methods.downloads import sha256_of
from methods.facecloak import FOCUS, NEAR, FaceCloak, IdentityMask, focus_budgets
from methods.faces import FaceDetector, NoFaceError
from methods.placement import Placement, budget_levels, face_region, paste, place, work_image
from methods.transforms import EOT_TRANSFORMS, eot_transform
from utils import (
    EDITOR_ID_HELP,
    EDITOR_IDS,
    InputError,
    ModelUnavailable,
    UserError,
    atomic_write,
    cpu_generator,
    derive_seed,
    linf_255,
    load_autoencoder,
    load_face_identity,
    load_image,
    load_perceptual,
    pick_device,
    pick_dtype,
    pil_to_tensor,
    png_output,
    quantize_within,
    run_script,
    save_png,
)

logger = logging.getLogger("defend")

#: Every default in one place: the official FaceLock code's, plus this project's additions.
DEFAULTS = dict(
    target_model="instruct-pix2pix", model_id=None, vae=None,
    attack_budget=0.03, step_size=0.01, num_iters=100, targeted=None, c=0.03, lr=0.03,
    fr_model="facenet", fr_combine="mean", faces="largest", allow_no_face=False, lpips="vgg", target_fr=None,
    eot=None, eot_samples=1, momentum=0.0, input_diversity=0.0, ti_kernel=0, schedule="linear",
    norm="linf", fidelity_weight=None, diffusion_steps=None, grad_reps=None, guidance_scale=None,
    image_guidance_scale=None, strength=None, attack_prompt=None, gradient_checkpointing=None,
    device="auto", dtype="auto", memory_format="channels_last", vae_tiling=False, compile=False,
    cudnn_benchmark=False, deterministic=False, seed=0,
    max_size=1024, region="full", bucket=8, overwrite=False,
    mask=None, gallery=None, focus="none", sticker_budget=0.251, highpass_budget=0.251, variations=8,
    mask_size=112, arc2face=0, near="gallery", mask_l2=0.0,
)
#: Defaults of one method, over the preset's (flags given explicitly still win): FaceCloak's paper budget 8/255,
#: step 2/255 and 10 passes, in [-1, 1] units, and its mask warped onto the whole photo (whatever the preset's region).
METHOD_DEFAULTS = {"facecloak": {"attack_budget": 0.0628, "step_size": 0.0157, "num_iters": 10, "region": "full"}}
#: Named groups of defaults; flags given explicitly still win.
PRESETS = {
    "official": {},
    "paper": {"attack_budget": 0.02, "step_size": 0.003},
    "small": {"vae": "madebyollin/taesd", "fr_model": "sface", "lpips": "none", "region": "face"},
}
#: Defaults of one method under one preset, over the preset's own: FaceLock with --preset small takes input
#: diversity, the transfer lever that lowered a face model it never saw most at equal budget (README, "Does it hold
#: against face models it never saw?"); the other methods were not measured with it.
PRESET_METHOD_DEFAULTS = {("small", "facelock"): {"input_diversity": 0.5}}
PRESET_HELP = ("official: the FaceLock code's defaults (full editor VAE, budget 0.03, step 0.01); "
               "paper: the paper's budget 0.02 and step 0.003; "
               "small: small real models that run in minutes on a laptop CPU (TAESD autoencoder, SFace face "
               "model, no LPIPS term; FaceLock with input diversity 0.5)")
#: With --norm l2 the budget is the L2 length of the whole perturbation: PhotoGuard's L2 attack (eps 16, step 1).
NORM_DEFAULTS = {"linf": {}, "l2": {"attack_budget": 16.0, "step_size": 1.0}}
#: Defaults a method declares for itself (the diffusion attack's 200 iterations), below presets and flags.
OWN_DEFAULTS = ("num_iters",)
MAX_BUDGET = 0.25
NO_FACE_HINT = "pass --allow_no_face to protect it with the latent and perceptual terms only"
FACECLOAK_NO_FACE = "facecloak masks faces only; the photo is left as it is"


def no_face_hint(method: str) -> str:
    return FACECLOAK_NO_FACE if method == "facecloak" else NO_FACE_HINT


def add_protection_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by defend.py and main_defend.py."""
    method = parser.add_argument_group("method")
    method.add_argument("--defend_method", required=True, choices=list(methods.METHODS),
                        help="the protection method (see the list below)")
    method.add_argument("--preset", choices=list(PRESETS), default="official", help=PRESET_HELP)
    method.add_argument("--attack_budget", type=float,
                        help="L-infinity budget in [-1, 1] pixel units (0.03 is about 3.8/255)")
    method.add_argument("--step_size", type=float, help="PGD step size, decaying to 1/100 of it (see --schedule)")
    method.add_argument("--schedule", choices=["linear", "cosine", "constant"],
                        help="PGD methods: how the step decays over the iterations (linear: the official code's)")
    method.add_argument("--num_iters", type=int, help="attack iterations")
    method.add_argument("--targeted", dest="targeted", action="store_const", const=True,
                        help="targeted attack (encoder: toward the zero latent; the encoder's default)")
    method.add_argument("--untargeted", dest="targeted", action="store_const", const=False,
                        help="untargeted attack (away from the clean latent; the cw default)")
    method.add_argument("--c", type=float, help="cw: weight of the latent term")
    method.add_argument("--lr", type=float, help="cw: Adam learning rate")
    method.add_argument("--seed", type=int, help="seed of the random start (each image gets its own stream)")
    method.add_argument("--eot", help="optimise through random cleanups so the protection survives them (expectation "
                                      f"over transformation): comma-separated, of {','.join(EOT_TRANSFORMS)}")
    method.add_argument("--eot_samples", type=int, help="transformed copies averaged per step with --eot")
    method.add_argument("--momentum", type=float,
                        help="PGD methods: MI-FGSM momentum (e.g. 1.0; 0: plain sign steps)")
    method.add_argument("--input_diversity", type=float,
                        help="PGD methods: probability per step of a random shrink-and-pad of the input (DI; 0: off)")
    method.add_argument("--ti_kernel", type=int,
                        help="PGD methods: smooth the gradient with a Gaussian of this odd size in pixels (TI; 0: off)")
    method.add_argument("--norm", choices=list(NORM_DEFAULTS),
                        help="PGD methods: linf (default) or l2, where --attack_budget is the L2 length of the whole "
                             "perturbation in [-1, 1] units and steps follow the normalised gradient (defaults then: "
                             "budget 16, step 1, PhotoGuard's L2 attack)")

    editor = parser.add_argument_group("editshield and diffusion")
    editor.add_argument("--fidelity_weight", type=float, help="editshield: weight of its MSE(x', x) term (0.1)")
    editor.add_argument("--diffusion_steps", type=int,
                        help="diffusion: denoising steps of the editor run unrolled (4; img2img runs "
                             "int(steps * strength) of them, as the pipeline)")
    editor.add_argument("--grad_reps", type=int, help="diffusion: stochastic generations averaged per step (10)")
    editor.add_argument("--guidance_scale", type=float, help="diffusion: the editor's text guidance (7.5)")
    editor.add_argument("--image_guidance_scale", type=float,
                        help="diffusion: the editor's image guidance (1.5, instruct-pix2pix)")
    editor.add_argument("--strength", type=float, help="diffusion: img2img strength (0.5, stable-diffusion)")
    editor.add_argument("--attack_prompt", help="diffusion: the instruction of the unrolled edit (default: empty)")
    editor.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_const",
                        const=False, help="diffusion: keep every activation instead of recomputing them in the "
                                          "backward pass (faster, several times the memory)")

    models = parser.add_argument_group("models")
    models.add_argument("--target_model", choices=list(EDITOR_IDS),
                        help="the editor to protect against; its autoencoder (from --model_id) is attacked")
    models.add_argument("--model_id", help=EDITOR_ID_HELP)
    models.add_argument("--vae", help="attack this autoencoder instead of the editor's (hub id or local folder, "
                                      "e.g. madebyollin/taesd)")
    models.add_argument("--fr_model", help="face recognition for facelock: facenet, sface, mobilefacenet, mobileface, "
                                           "adaface (runs Python code from its hub repository, at a pinned revision) "
                                           "or a path to an .onnx face model; a comma-separated list attacks them "
                                           "together (e.g. sface,mobileface)")
    models.add_argument("--fr_combine", choices=["mean", "max"],
                        help="with several --fr_model: attack their mean similarity, or per image the highest "
                             "(the hardest model)")
    models.add_argument("--faces", choices=["largest", "all"], help="facelock: protect the largest face or all")
    models.add_argument("--allow_no_face", action="store_true", default=None,
                        help="facelock: protect images without a detectable face with the latent and LPIPS terms")
    models.add_argument("--lpips", choices=["vgg", "none"], help="facelock's perceptual term: LPIPS-VGG or none")
    models.add_argument("--target_fr", type=float,
                        help="facelock: stop an image early once its reconstruction's FR similarity (by the attack's "
                             "own face model) falls below this value")
    models.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    models.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                        help="model weights' dtype (auto: float16 on CUDA, float32 on CPU); the perturbation "
                             "itself is always optimised in float32")
    models.add_argument("--memory_format", choices=["channels_last", "contiguous"],
                        help="memory layout of the models' convolutions (channels_last: about 25%% faster on a CPU)")
    models.add_argument("--vae_tiling", action="store_true", default=None,
                        help="run the autoencoder tile by tile, so large photos fit a small GPU")
    models.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the models (opt-in: compiling takes minutes; measure before relying on it)")
    models.add_argument("--cudnn_benchmark", action="store_true", default=None,
                        help="CUDA: let cuDNN pick the fastest convolution per image size (pays off over a folder "
                             "whose photos share size buckets)")
    models.add_argument("--deterministic", action="store_true", default=None,
                        help="CUDA: deterministic kernels only, so a rerun gives the same bits (slower)")
    models.add_argument("--max_size", type=int,
                        help="attack larger photos at this long side and resize the perturbation back (0: never)")
    models.add_argument("--region", choices=["full", "face"],
                        help="attack the whole photo, or only a square around its face(s) with a margin (faster; the "
                             "rest of the photo is left untouched; not with facecloak, whose mask covers the faces "
                             "alone)")
    models.add_argument("--bucket", type=int,
                        help="pad each photo's work image to a multiple of this many pixels (a multiple of 8); "
                             "photos of one bucket are batched together, with the same result as alone")
    cloak = parser.add_argument_group("facecloak")
    cloak.add_argument("--mask", help="apply this identity mask (a .safetensors file learned earlier) instead of "
                                      "learning one: no optimisation, a fraction of a second per photo")
    cloak.add_argument("--gallery", help="photos of other people (a folder; 10 or more faces), the anchors a mask is "
                                         "learned against")
    cloak.add_argument("--focus", help=f"focusing inside the optimisation: none or a comma-separated subset of "
                                       f"{','.join(FOCUS)}")
    cloak.add_argument("--sticker_budget", type=float,
                       help="budget in the eye, nose and mouth boxes with --focus stickers ([-1, 1] units)")
    cloak.add_argument("--highpass_budget", type=float,
                       help="budget where the face has high-frequency texture with --focus highpass ([-1, 1] units)")
    cloak.add_argument("--variations", type=int, help="synthetic variations (pose, lighting, colour, blur, JPEG) of "
                                                      "each photo per pass")
    cloak.add_argument("--mask_size", type=int, help="side of the mask in the aligned face space (112 or a multiple)")
    cloak.add_argument("--near", choices=NEAR, help="the triplet loss's near anchor: gallery (the other person most "
                                                    "like this one, the paper's) or self (this person's own face)")
    cloak.add_argument("--mask_l2", type=float,
                       help="also bound the mask's L2 length in the aligned face ([-1, 1] units, at --mask_size) and "
                            "take L2 steps; --attack_budget then caps each pixel (e.g. --mask_l2 16 --attack_budget "
                            "0.25; 0: off)")
    cloak.add_argument("--arc2face", type=int, help="also learn from this many photos per photo generated by Arc2Face "
                                                    "(as the paper: downloads Stable Diffusion 1.5 and Arc2Face from "
                                                    "the hub; a GPU advised; 0: off)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs")


def create_argparser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="defend methods:\n" + methods.describe(),
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with, under the explicit flags, the method's own defaults, the preset's (for all methods, then for this
    one), the norm's and this project's for the method (each above the one before), and check the values."""
    parser.set_defaults(**DEFAULTS)
    known, _ = parser.parse_known_args(argv)
    own = inspect.signature(methods.get_method(known.defend_method).__init__).parameters
    parser.set_defaults(**{**DEFAULTS, **{k: own[k].default for k in OWN_DEFAULTS if k in own},
                           **PRESETS[known.preset],
                           **PRESET_METHOD_DEFAULTS.get((known.preset, known.defend_method), {}),
                           **NORM_DEFAULTS[known.norm], **METHOD_DEFAULTS.get(known.defend_method, {})})
    args = parser.parse_args(argv)
    if args.norm == "linf" and not 0 < args.attack_budget <= MAX_BUDGET:
        parser.error(f"--attack_budget must be in (0, {MAX_BUDGET}] ([-1, 1] units), got {args.attack_budget}")
    if args.attack_budget <= 0:
        parser.error(f"--attack_budget must be > 0, got {args.attack_budget}")
    if args.step_size <= 0 or args.num_iters < 1 or args.max_size < 0 or args.eot_samples < 1:
        parser.error("--step_size must be > 0, --num_iters and --eot_samples >= 1 and --max_size >= 0")
    if args.bucket < 8 or args.bucket % 8:
        parser.error(f"--bucket must be a multiple of 8, got {args.bucket}")
    if args.momentum < 0 or not 0 <= args.input_diversity <= 1 or (args.ti_kernel and args.ti_kernel % 2 == 0) \
            or args.ti_kernel < 0:
        parser.error("--momentum must be >= 0, --input_diversity in [0, 1] and --ti_kernel 0 or odd")
    unknown = sorted(set(args.eot.split(",")) - set(EOT_TRANSFORMS)) if args.eot else []
    if unknown:
        parser.error(f"--eot takes a subset of {','.join(EOT_TRANSFORMS)}; unknown: {','.join(unknown)}")
    args.model_id = args.model_id or EDITOR_IDS[args.target_model]
    focus = [] if args.focus == "none" else args.focus.split(",")
    if sorted(set(focus) - set(FOCUS)) or not focus and args.focus != "none":
        parser.error(f"--focus takes none or a comma-separated subset of {','.join(FOCUS)}, got {args.focus}")
    if not (0 < args.sticker_budget <= 1 and 0 < args.highpass_budget <= 1) or args.variations < 0 or \
            args.mask_size < 112 or args.mask_size % 112 or args.arc2face < 0 or args.mask_l2 < 0:
        parser.error("--sticker_budget and --highpass_budget must be in (0, 1], --variations, --arc2face and "
                     "--mask_l2 >= 0 and --mask_size a multiple of 112")
    caps = focus_budgets(args.attack_budget, focus, args.sticker_budget, args.highpass_budget)
    if args.mask_l2 > max(caps) * args.mask_size * math.sqrt(3):  # even with every pixel at its largest budget
        parser.error(f"--mask_l2 {args.mask_l2} cannot be reached with each pixel capped at --attack_budget "
                     f"{args.attack_budget}: raise --attack_budget (e.g. 0.25) or lower --mask_l2")
    if (args.mask or args.gallery or args.mask_l2 or args.near != "gallery") and args.defend_method != "facecloak":
        parser.error("--mask, --gallery, --near and --mask_l2 are options of --defend_method facecloak")
    if args.defend_method == "facecloak" and args.region == "face":
        parser.error("--region face is not for facecloak: its mask is warped onto the faces themselves and the rest "
                     "of the photo is left untouched anyway")
    return args


def budget_in_255(budget: float, norm: str = "linf") -> str:
    if norm == "l2":
        return f"{budget} (L2 length of the whole perturbation, [-1, 1] units)"
    return f"{budget} ({budget * 127.5:.1f}/255)"


def configure_backends(args: argparse.Namespace) -> None:
    """torch's global switches for --cudnn_benchmark and --deterministic."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark) and not args.deterministic


def build_attack(args: argparse.Namespace, device: torch.device, progress: bool = True) -> methods.Attack:
    """Load the models the chosen method needs and build it from the options."""
    cls = methods.get_method(args.defend_method)
    levers = [flag for flag, on in (("--eot", args.eot), ("--momentum", args.momentum),
                                    ("--input_diversity", args.input_diversity), ("--ti_kernel", args.ti_kernel),
                                    ("--norm l2", args.norm == "l2")) if on]
    if levers and not issubclass(cls, methods.PGDAttack):
        pgd = ", ".join(name for name, c in methods.METHODS.items() if issubclass(c, methods.PGDAttack))
        raise UserError(f"{' and '.join(levers)} work(s) with the PGD methods ({pgd}), not {args.defend_method}")
    dtype = pick_dtype(args.dtype, device)
    components = {}
    if "autoencoder" in cls.models:
        components["autoencoder"] = load_autoencoder(args.vae, args.model_id, device, dtype)
    if "face" in cls.models and not args.mask:  # an identity mask made earlier needs only the detector
        components["face"] = load_face_identity(args.fr_model, device, keep=args.faces, combine=args.fr_combine)
    if "editor" in cls.models:
        components["editor"] = load_attacked_editor(args, device)
    if "perceptual" in cls.models:
        components["perceptual"] = load_perceptual(args.lpips, device)
        if components["perceptual"] is None:
            print("LPIPS term off (--lpips none): facelock runs with its face-recognition and latent terms only")
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    for model in components.values():
        if model is not None:
            model.to(memory_format=memory_format)
    if args.vae_tiling and ("autoencoder" in components or "editor" in components):
        autoencoder = components["autoencoder"] if "autoencoder" in components else components["editor"].autoencoder.vae
        autoencoder.enable_tiling()
    if args.compile:
        compile_models(components)
    return methods.create(
        args.defend_method, **components, eps=args.attack_budget, step_size=args.step_size,
        num_iters=args.num_iters, targeted=args.targeted, c=args.c, lr=args.lr,
        allow_no_face=args.allow_no_face, target_fr=args.target_fr, progress=progress,
        eot=eot_transform(args.eot.split(",")) if args.eot else None, eot_samples=args.eot_samples,
        momentum=args.momentum, input_diversity=args.input_diversity, ti_kernel=args.ti_kernel,
        schedule=args.schedule, norm=args.norm,
        fidelity_weight=args.fidelity_weight, steps=args.diffusion_steps, grad_reps=args.grad_reps,
        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale, strength=args.strength,
        prompt=args.attack_prompt, gradient_checkpointing=args.gradient_checkpointing,
        detector=FaceDetector(keep=args.faces), mask=load_mask(args.mask) if args.mask else None,
        focus=[] if args.focus == "none" else args.focus.split(","), sticker_budget=args.sticker_budget,
        highpass_budget=args.highpass_budget, variations=args.variations, mask_size=args.mask_size,
        max_size=args.max_size, near=args.near, mask_l2=args.mask_l2,
    )


def load_attacked_editor(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The editing pipeline of --target_model/--model_id (its autoencoder replaced by --vae, if given), loaded as
    edit.py loads it, for the methods that run the editor itself."""
    from edit import load_editor
    from methods.diffusion import DiffusionEditor

    options = argparse.Namespace(model=args.target_model, model_id=args.model_id, vae=args.vae, dtype=args.dtype,
                                 attention_slicing=False, cpu_offload=False)
    return DiffusionEditor(load_editor(options, device, progress=False))


def load_mask(path: str | Path) -> IdentityMask:
    try:
        return IdentityMask.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--mask {path}: not an identity mask ({str(error).splitlines()[0]})") from None


def learn_mask(args: argparse.Namespace, attack: FaceCloak, sources: Sequence[Path], path: Path) -> dict:
    """Learn the identity mask of the person in `sources` against `--gallery`, save it to `path` (atomically) and
    return its provenance for the manifest. Files that cannot be read or show no face are left out and named."""
    if not args.gallery:
        raise UserError("facecloak learns a mask against photos of other people: pass --gallery DIR (or apply a "
                        "mask learned earlier with --mask)")
    left_out = {}

    def readable(paths: Sequence[Path]):
        for source in paths:
            try:
                yield pil_to_tensor(load_image(source))
            except InputError as error:
                left_out[str(source)] = str(error)

    chosen = list(sources)
    gallery = [p for p in photos_under(args.gallery) if all(p.resolve() != s.resolve() for s in chosen)]
    print(f"learning a facecloak mask from {len(chosen)} photo(s) against {len(gallery)} gallery photos "
          f"({args.num_iters} passes, {args.variations} variations per photo)")
    photos, synthetic = readable(chosen), []
    if args.arc2face:
        photos = list(photos)
        synthetic = synthetic_photos(args, attack, photos)
    mask = attack.learn([*photos, *synthetic] if synthetic else photos, readable(gallery),
                        cpu_generator(derive_seed(args.seed, "facecloak")))
    used = [s for s in chosen if str(s) not in left_out]
    for i in mask.info["no_face"]:
        if i < len(used):  # the others are synthetic
            left_out[str(used[i])] = "no face found"
    mask.info.update(learned_from=[str(s) for s in used if str(s) not in left_out], gallery=str(args.gallery),
                     left_out=left_out, synthetic=len(synthetic))
    atomic_write(path, mask.save)
    print(f"mask saved to {path} ({mask.info['seconds']:.1f} s; triplet loss per pass {mask.info['loss']}); protect "
          f"new photos of this person with --defend_method facecloak --mask {path}")
    return mask_provenance(mask, path)


def synthetic_photos(args: argparse.Namespace, attack: FaceCloak, photos: list[torch.Tensor]) -> list[torch.Tensor]:
    """`--arc2face` new photos of the person per photo, generated by Arc2Face from the hub."""
    from methods.arc2face import load_arc2face

    device = next(attack.face.parameters()).device
    try:
        arc2face = load_arc2face(attack.detector, device, pick_dtype(args.dtype, device))
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"cannot load Arc2Face ({str(error).splitlines()[0]}); it comes from the Hugging Face "
                               f"hub (FoivosPar/Arc2Face and Stable Diffusion 1.5): run without --arc2face offline")
    print(f"generating {args.arc2face} Arc2Face photo(s) per photo")
    out = []
    for k, photo in enumerate(photos):
        images = arc2face.generate(photo, args.arc2face, cpu_generator(derive_seed(args.seed, "arc2face", k)))
        out += [image[None].cpu() for image in images]
    return out


def mask_provenance(mask: IdentityMask, path: Path) -> dict:
    """What the manifest records of the mask a folder was protected with."""
    return {"path": str(path), "sha256": sha256_of(path), **mask.info}


#: Compiled graphs kept per network: one per size bucket (and batch size) of a folder, compiled once and reused.
COMPILED_SHAPES = 64


def compile_models(components: dict) -> None:
    """torch.compile the networks that do the work: the autoencoder's encoder and decoder, the editor's UNet, the
    face network and LPIPS' backbone. Shapes are static; each new size bucket is compiled once and kept (up to
    `COMPILED_SHAPES`)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILED_SHAPES)
    networks = []
    if "autoencoder" in components:
        networks += [components["autoencoder"].encoder, components["autoencoder"].decoder]
    if "editor" in components:
        networks.append(components["editor"].unet)
    if components.get("face") is not None:
        networks += components["face"].networks()
    if components.get("perceptual") is not None:
        networks.append(components["perceptual"].lpips.net)
    for network in networks:
        network.compile(dynamic=False)


def describe_attack(args: argparse.Namespace, attack: methods.Attack) -> str:
    parts = [f"{args.defend_method}: budget {budget_in_255(args.attack_budget, args.norm)}"]
    if isinstance(attack, FaceCloak):  # applying a mask has no steps; learning one takes passes over the photos
        l2 = f"mask L2 {args.mask_l2} (steps {args.mask_l2 * L2_STEP:g})" if args.mask_l2 else f"step {args.step_size}"
        parts.append(f"mask {args.mask}" if args.mask else f"{l2}, {args.num_iters} passes, focus {args.focus}, near "
                     f"{args.near}, {args.variations} variations per photo, gallery {args.gallery}")
    elif hasattr(attack, "step_size"):
        parts.append(f"step {args.step_size}")
    if hasattr(attack, "num_iters") and not isinstance(attack, FaceCloak):
        parts.append(f"{args.num_iters} iterations")
    if getattr(attack, "eot", None) is not None:
        parts.append(f"EOT over {args.eot} ({args.eot_samples} per step)")
    levers = [f"{name} {value}" for name, value in (("momentum", args.momentum), ("DI", args.input_diversity),
                                                     ("TI kernel", args.ti_kernel)) if value]
    if levers and isinstance(attack, methods.PGDAttack):
        parts.append(", ".join(levers))
    if "autoencoder" in attack.models:
        parts.append(f"autoencoder {args.vae or args.model_id + ' (vae)'}")
    if "editor" in attack.models:
        swapped = f" with autoencoder {args.vae}" if args.vae else ""
        parts.append(f"editor {args.target_model} {args.model_id}{swapped}, {attack.steps} steps unrolled, "
                     f"{attack.grad_reps} generations per step")
    if getattr(attack, "face", None) is not None:
        parts.append(f"face model {args.fr_model}" + (f" ({args.fr_combine})" if "," in args.fr_model else ""))
    if "perceptual" in attack.models:
        parts.append(f"LPIPS {args.lpips}")
    return ", ".join(parts)


def placements(images: Sequence[Image.Image], args: argparse.Namespace, attack: methods.Attack) -> list[Placement]:
    """Where each image is attacked (`--region`), at what size (`--max_size`) and padding (`--bucket`). A face region
    is found with the attack's own detector where it has one; an image without a face is attacked whole (FaceLock
    then refuses it unless --allow_no_face). FaceCloak's mask goes onto the whole photo at its own size (its
    detector looks at a copy at most --max_size long)."""
    if isinstance(attack, FaceCloak):
        return [place(image.size, None, 0, args.bucket) for image in images]
    detector = None
    if args.region == "face":
        face = getattr(attack, "face", None)
        detector = face.detector if face is not None else FaceDetector(keep=args.faces)
    result = []
    for image in images:
        box = face_region(image, detector) if detector is not None else None
        result.append(place(image.size, box, args.max_size, args.bucket))
    return result


def protect_images(attack: methods.Attack, images: Sequence[Image.Image], seeds: Sequence[int],
                   device: torch.device, where: Sequence[Placement]) -> list[tuple[np.ndarray, dict]]:
    """Protect images whose placements share one padded size, in one batch; each image's random start comes from
    its own seed. Returns the 8-bit protected images and their statistics (L-infinity in 1/255, PSNR in dB,
    seconds)."""
    start = time.perf_counter()
    x = torch.cat([work_image(image, placement) for image, placement in zip(images, where)]).to(device)
    if isinstance(attack, FaceCloak):
        results = cloak_images(attack, images, seeds, x, where)
    else:
        delta = attack(x, [cpu_generator(s) for s in seeds]) - x
        results = []
        for image, placement, change, seed in zip(images, where, delta, seeds):
            out, stats = paste(image, placement, change, attack.eps, attack.norm)
            if attack.norm == "linf" and stats["linf_255"] > attack.eps * 127.5:
                raise AssertionError(f"budget broken after rounding: {stats['linf_255']}/255 > "
                                     f"{attack.eps * 127.5:.2f}/255")
            if attack.norm == "l2" and stats["l2"] > attack.eps + 1e-6:
                raise AssertionError(f"budget broken after rounding: L2 {stats['l2']} > {attack.eps}")
            results.append((out, {"seed": seed, "linf_255": stats["linf_255"], "l2": round(stats["l2"], 4),
                                  "psnr": round(stats["psnr"], 3), "region": list(placement.box)}))
    seconds = (time.perf_counter() - start) / len(images)
    return [(out, {**stats, "seconds": round(seconds, 3)}) for out, stats in results]


def cloak_images(attack: FaceCloak, images: Sequence[Image.Image], seeds: Sequence[int], x: torch.Tensor,
                 where: Sequence[Placement]) -> list[tuple[np.ndarray, dict]]:
    """FaceCloak's mask warped onto the work images `x` (whole photos, never scaled; see `placements`): each pixel
    of the 8-bit result within its own budget, the warp of the mask's budget map, checked after rounding."""
    protected, budgets = attack.cloak(x)
    results = []
    for image, placement, adv, budget, seed in zip(images, where, protected, budgets, seeds):
        width, height = image.size
        clean, eps = np.asarray(image), budget[:, :height, :width].permute(1, 2, 0).cpu().numpy()
        out = quantize_within(adv[:, :height, :width], clean, eps)
        distance = linf_255(out, clean)
        if distance > attack.eps * 127.5 or (np.abs(out.astype(np.int64) - clean) > budget_levels(eps)).any():
            raise AssertionError(f"budget broken after rounding: {distance}/255 > {attack.eps * 127.5:.2f}/255 or "
                                 f"above the mask's budget map")
        quality = psnr(pil_to_tensor(Image.fromarray(out)), pil_to_tensor(image)).item()
        results.append((out, {"seed": seed, "linf_255": distance, "psnr": round(quality, 3),
                              "region": list(placement.box)}))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = create_argparser(__doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True, help="the photo to protect")
    parser.add_argument("--output_path", help="where to write the protected PNG (default: <input>_protected.png "
                                              "beside the input)")
    parser.add_argument("--web", action="store_true", help="start the web page on http://127.0.0.1:7860 instead "
                                                           "(python -m evaluation.web --help: its options)")
    add_protection_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--web" in argv:
        from evaluation import web

        return web.main([a for a in argv if a != "--web"])
    args = parse_args(build_parser(), argv)

    source = Path(args.input_path)
    output = png_output(source, args.output_path, f"{source.stem}_protected.png",
                        "protected images are written as PNG (a lossy format would damage the perturbation)")
    image = load_image(source)
    if output.exists() and not args.overwrite:
        print(f"{output} exists; nothing to do (pass --overwrite to replace it)")
        return 0

    mask_path = output.with_name(f"{output.stem}_mask.safetensors")
    learning = args.defend_method == "facecloak" and not args.mask
    if learning and mask_path.exists() and not args.overwrite:
        raise UserError(f"{mask_path} exists; apply it with --mask {mask_path}, or pass --overwrite to learn anew")
    device = pick_device(args.device)
    configure_backends(args)
    attack = build_attack(args, device)
    print(f"protecting {source} ({image.width}x{image.height}) with {describe_attack(args, attack)} on {device}")
    seed = derive_seed(args.seed, source.stem)
    try:
        if learning:
            learn_mask(args, attack, [source], mask_path)
        (protected, stats), = protect_images(attack, [image], [seed], device, placements([image], args, attack))
    except NoFaceError:
        raise UserError(f"{source}: no face found ({no_face_hint(args.defend_method)})") from None
    save_png(protected, output)
    length = f", L2 {stats['l2']}" if args.norm == "l2" else ""
    print(f"wrote {output}: L-inf {stats['linf_255']}/255{length} (budget "
          f"{budget_in_255(args.attack_budget, args.norm)}), PSNR {stats['psnr']:.2f} dB, {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
