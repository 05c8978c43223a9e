"""The options of a protection: every default in one place, the presets, and the one validation of a set of options,
shared by `defend.py`, `main_defend.py`, the web page and the benchmarks.

A library caller names what it wants (`resolve(defend_method="facelock", preset="small", attack_budget=0.0314)`); a
script parses its command line with `parse`, which resolves the flags given in the same way. Under the options given,
each layer of defaults wins over the one before: this project's (`ProtectionOptions`), the method's own (its
signature's `num_iters`), the preset's, the preset's for this method, the norm's, and the method's declared
`defaults` (FaceCloak's paper budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import methods
from methods.facecloak import FOCUS, NEAR, focus_budgets
from methods.models.loading import EDITOR_ID_HELP, EDITOR_IDS
from methods.transforms import EOT_TRANSFORMS
from utils import MIN_SIDE, UserError


@dataclass(frozen=True)
class ProtectionOptions:
    """Every option of a protection, with this project's defaults: the official FaceLock code's, plus additions.
    None means "the method's own default" where a method has one (targeted, the diffusion attack's settings)."""

    defend_method: str
    preset: str = "official"
    # the attack
    attack_budget: float = 0.03
    step_size: float = 0.01
    num_iters: int = 100
    targeted: bool | None = None
    c: float = 0.03
    lr: float = 0.03
    seed: int = 0
    eot: str | None = None
    eot_samples: int = 1
    momentum: float = 0.0
    input_diversity: float = 0.0
    ti_kernel: int = 0
    schedule: str = "linear"
    norm: str = "linf"
    chroma: float = 1.0
    smooth_perturbation: int = 0
    dct_keep: int = 0
    flat_budget: float = 1.0
    surrogate_noise: float = 0.0
    landmark_jitter: float = 0.0
    antialias: bool = False
    feature_weight: float = 0.0
    # editshield and diffusion
    fidelity_weight: float | None = None
    diffusion_steps: int | None = None
    grad_reps: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    strength: float | None = None
    attack_prompt: str | None = None
    gradient_checkpointing: bool | None = None
    # models
    target_model: str = "instruct-pix2pix"
    model_id: str | None = None
    vae: str | None = None
    fr_model: str = "facenet"
    fr_combine: str = "mean"
    faces: str = "largest"
    allow_no_face: bool = False
    lpips: str = "vgg"
    target_fr: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    memory_format: str = "channels_last"
    vae_tiling: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False
    max_size: int = 1024
    region: str = "full"
    bucket: int = 8
    overwrite: bool = False
    # facecloak
    mask: str | None = None
    gallery: str | None = None
    focus: str = "none"
    sticker_budget: float = 0.251
    highpass_budget: float = 0.251
    variations: int = 8
    mask_size: int = 112
    arc2face: int = 0
    near: str = "gallery"
    mask_l2: float = 0.0

    @property
    def focus_list(self) -> list[str]:
        return [] if self.focus == "none" else self.focus.split(",")

    def replace(self, **changes: Any) -> ProtectionOptions:
        return dataclasses.replace(self, **changes)


#: The options' names, in their order (the keys of a manifest's parameters).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ProtectionOptions))
#: Every default in one place (the dataclass's), by name.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ProtectionOptions)
            if f.name not in ("defend_method", "preset")}
#: Named groups of defaults; options given explicitly still win.
PRESETS = {
    "official": {},
    "paper": {"attack_budget": 0.02, "step_size": 0.003},
    # 0.0314 is 4/255, four whole 8-bit levels: the official 0.03 (3.8/255) keeps three once rounded to 8 bits
    "small": {"vae": "madebyollin/taesd", "fr_model": "sface", "lpips": "none", "region": "face",
              "attack_budget": 0.0314},
}
#: Defaults of one method under one preset, over the preset's own: FaceLock with --preset small takes input
#: diversity, the transfer lever that lowered a face model it never saw most at equal budget
#: (evaluation/results/transfer.md), antialiased face crops, which lowered the held-out models on all four whole
#: portraits at the same cost and change nothing on a face no larger than the face model's crop, and half its steps
#: through the way photos are shared (`--eot none,share`) with the 200 iterations that EOT needs, which lowered the
#: held-out models after JPEG 75 on the portraits and the 14 crops and kept the protection as posted
#: (evaluation/results/portraits.md, transfer-14.md) for twice the time; the other methods were not measured with them.
PRESET_METHOD_DEFAULTS = {("small", "facelock"): {"input_diversity": 0.5, "antialias": True, "eot": "none,share",
                                                  "num_iters": 200}}
PRESET_HELP = ("official: the FaceLock code's defaults (full editor VAE, budget 0.03, step 0.01); "
               "paper: the paper's budget 0.02 and step 0.003; "
               "small: small real models that ship with the toolkit and run in minutes on a laptop CPU (TAESD "
               "autoencoder, SFace face model, no LPIPS term, budget 0.0314 = 4/255; FaceLock with input "
               "diversity 0.5, antialiased face crops and 200 iterations, half of them through JPEG and resizing "
               "as photos are shared: --eot none,share)")
#: With --norm l2 the budget is the L2 length of the whole perturbation: PhotoGuard's L2 attack (eps 16, step 1).
NORM_DEFAULTS = {"linf": {}, "l2": {"attack_budget": 16.0, "step_size": 1.0}}
#: Defaults a method declares in its signature (the diffusion attack's 200 iterations), below presets and flags.
OWN_DEFAULTS = ("num_iters",)
MAX_BUDGET = 0.25
#: One 8-bit level in [-1, 1] units: the smallest budget that can change a pixel.
ONE_LEVEL = 1 / 127.5


class OptionError(UserError):
    """A set of options that cannot be run; the message names the option and what it takes."""


def l2_limit(width: int, height: int) -> float:
    """The longest change (L2, [-1, 1] units) an RGB image of this size can take: `MAX_BUDGET` on every pixel."""
    return MAX_BUDGET * math.sqrt(3 * width * height)


def budget_in_255(budget: float, norm: str = "linf") -> str:
    if norm == "l2":
        return f"{budget} (L2 length of the whole perturbation, [-1, 1] units)"
    return f"{budget} ({budget * 127.5:.1f}/255)"


def layered_defaults(defend_method: str, preset: str = "official", norm: str = "linf") -> dict[str, Any]:
    """The defaults of a method under a preset and a norm, each layer over the one before (see the module's text)."""
    cls = methods.get_method(defend_method)
    own = inspect.signature(cls.__init__).parameters
    return {**DEFAULTS, **{k: own[k].default for k in OWN_DEFAULTS if k in own}, **PRESETS[preset],
            **PRESET_METHOD_DEFAULTS.get((preset, defend_method), {}), **NORM_DEFAULTS[norm], **cls.defaults}


def resolve(defend_method: str, preset: str | None = None, **given: Any) -> ProtectionOptions:
    """The options of a protection: `given` (an option set to None counts as not given) over the layered defaults
    of `defend_method` and `preset`, checked. Raises `OptionError` with one line naming what is wrong."""
    if defend_method not in methods.METHODS:
        raise OptionError(f"unknown defend method {defend_method!r}; choose one of {', '.join(methods.METHODS)}")
    preset = preset or "official"
    if preset not in PRESETS:
        raise OptionError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(f"unknown protection option(s): {', '.join(unknown)}")
    explicit = {k: v for k, v in given.items() if v is not None}
    norm = explicit.get("norm", DEFAULTS["norm"])
    if norm not in NORM_DEFAULTS:
        raise OptionError(f"--norm takes {' or '.join(NORM_DEFAULTS)}, got {norm!r}")
    values = {**layered_defaults(defend_method, preset, norm), **explicit}
    values["model_id"] = values["model_id"] or EDITOR_IDS[values["target_model"]]
    if values["eot"] == "none":  # the photo as posted and nothing else: no EOT (turns a preset's off)
        values["eot"] = None
    options = ProtectionOptions(defend_method=defend_method, preset=preset, **values)
    validate(options)
    return options


def validate(o: ProtectionOptions) -> None:
    """Raise `OptionError` for options that cannot run, or not together: every number finite, budgets between one
    8-bit level and the largest change a photo can take, a device torch knows, a work size the models can see."""
    for name, value in dataclasses.asdict(o).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"--{name} must be a finite number, got {value}")
    if o.norm == "linf" and not 0 < o.attack_budget <= MAX_BUDGET:
        raise OptionError(f"--attack_budget must be in (0, {MAX_BUDGET}] ([-1, 1] units), got {o.attack_budget}")
    if o.attack_budget <= 0:
        raise OptionError(f"--attack_budget must be > 0, got {o.attack_budget}")
    if o.attack_budget < ONE_LEVEL:
        raise OptionError(f"--attack_budget {o.attack_budget} is less than one 8-bit level ({ONE_LEVEL:.4f} in [-1, 1] "
                          f"units, 1/255): no pixel could change")
    if o.norm == "l2" and o.max_size and o.attack_budget > l2_limit(o.max_size, o.max_size):
        longest = l2_limit(o.max_size, o.max_size)
        raise OptionError(f"--attack_budget {o.attack_budget} (L2) is longer than any photo attacked at --max_size "
                          f"{o.max_size} can take ({longest:.1f}: {MAX_BUDGET} on every pixel)")
    if o.step_size <= 0 or o.num_iters < 1 or o.max_size < 0 or o.eot_samples < 1:
        raise OptionError("--step_size must be > 0, --num_iters and --eot_samples >= 1 and --max_size >= 0")
    if 0 < o.max_size < MIN_SIDE:
        raise OptionError(f"--max_size must be 0 (full size) or at least {MIN_SIDE} px, got {o.max_size}")
    if o.c < 0 or o.lr <= 0 or (o.fidelity_weight is not None and o.fidelity_weight < 0):
        raise OptionError("--c and --fidelity_weight must be >= 0 and --lr > 0")
    if (o.diffusion_steps is not None and o.diffusion_steps < 1) or (o.grad_reps is not None and o.grad_reps < 1) \
            or (o.strength is not None and not 0 < o.strength <= 1):
        raise OptionError("--diffusion_steps and --grad_reps must be >= 1 and --strength in (0, 1]")
    if o.device != "auto":
        try:
            torch.device(o.device)
        except (RuntimeError, ValueError):
            raise OptionError(f"--device {o.device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if o.bucket < 8 or o.bucket % 8:
        raise OptionError(f"--bucket must be a multiple of 8, got {o.bucket}")
    if o.momentum < 0 or not 0 <= o.input_diversity <= 1 or (o.ti_kernel and o.ti_kernel % 2 == 0) \
            or o.ti_kernel < 0:
        raise OptionError("--momentum must be >= 0, --input_diversity in [0, 1] and --ti_kernel 0 or odd")
    even = o.smooth_perturbation and o.smooth_perturbation % 2 == 0
    if not 0 <= o.chroma <= 1 or o.smooth_perturbation < 0 or even or not 0 < o.flat_budget <= 1 \
            or o.surrogate_noise < 0 or o.landmark_jitter < 0 or o.feature_weight < 0 or not 0 <= o.dct_keep <= 14:
        raise OptionError("--chroma must be in [0, 1], --smooth_perturbation 0 or odd, --dct_keep in [0, 14], "
                          "--flat_budget in (0, 1] and --surrogate_noise, --landmark_jitter and --feature_weight >= 0")
    if o.flat_budget < 1 and o.norm != "linf":
        raise OptionError("--flat_budget shapes an L-infinity budget; it does not go with --norm l2")
    unknown = sorted(set(o.eot.split(",")) - set(EOT_TRANSFORMS)) if o.eot else []
    if unknown:
        raise OptionError(f"--eot takes a subset of {','.join(EOT_TRANSFORMS)}; unknown: {','.join(unknown)}")
    focus = o.focus_list
    if sorted(set(focus) - set(FOCUS)) or not focus and o.focus != "none":
        raise OptionError(f"--focus takes none or a comma-separated subset of {','.join(FOCUS)}, got {o.focus}")
    if not (0 < o.sticker_budget <= 1 and 0 < o.highpass_budget <= 1) or o.variations < 0 or \
            o.mask_size < 112 or o.mask_size % 112 or o.arc2face < 0 or o.mask_l2 < 0:
        raise OptionError("--sticker_budget and --highpass_budget must be in (0, 1], --variations, --arc2face and "
                          "--mask_l2 >= 0 and --mask_size a multiple of 112")
    caps = focus_budgets(o.attack_budget, focus, o.sticker_budget, o.highpass_budget)
    if o.mask_l2 > max(caps) * o.mask_size * math.sqrt(3):  # even with every pixel at its largest budget
        raise OptionError(f"--mask_l2 {o.mask_l2} cannot be reached with each pixel capped at --attack_budget "
                          f"{o.attack_budget}: raise --attack_budget (e.g. 0.25) or lower --mask_l2")
    cls = methods.get_method(o.defend_method)
    if (o.mask or o.gallery or o.mask_l2 or o.near != "gallery") and not cls.learns:
        raise OptionError("--mask, --gallery, --near and --mask_l2 are options of --defend_method facecloak")
    if cls.placement == "photo" and o.region == "face":
        raise OptionError(f"--region face is not for {o.defend_method}: {cls.placement_reason}")


# ------------------------------------------------------------------------------------------- command lines

def add_protection_arguments(parser: argparse.ArgumentParser) -> None:
    """The protection's options on a command line (defend.py, main_defend.py, the page). Every default is None
    here: `parse` resolves what was not given."""
    method = parser.add_argument_group("method")
    method.add_argument("--defend_method", required=True, choices=list(methods.METHODS),
                        help="the protection method (see the list below)")
    method.add_argument("--preset", choices=list(PRESETS), help=PRESET_HELP)
    method.add_argument("--attack_budget", type=float,
                        help="L-infinity budget in [-1, 1] pixel units (0.03 is about 3.8/255)")
    method.add_argument("--step_size", type=float, help="PGD step size, decaying to 1/100 of it (see --schedule)")
    method.add_argument("--schedule", choices=["linear", "cosine", "constant"],
                        help="PGD methods: how the step decays over the iterations (linear: the official code's)")
    method.add_argument("--num_iters", type=int, help="attack iterations")
    direction = method.add_mutually_exclusive_group()
    direction.add_argument("--targeted", dest="targeted", action="store_const", const=True,
                           help="targeted attack (encoder: toward the zero latent; the encoder's default)")
    direction.add_argument("--untargeted", dest="targeted", action="store_const", const=False,
                           help="untargeted attack (away from the clean latent; the cw default)")
    method.add_argument("--c", type=float, help="cw: weight of the latent term")
    method.add_argument("--lr", type=float, help="cw: Adam learning rate")
    method.add_argument("--seed", type=int, help="seed of the random start (each image gets its own stream)")
    method.add_argument("--eot", help="optimise through random cleanups so the protection survives them (expectation "
                                      f"over transformation): comma-separated, of {','.join(EOT_TRANSFORMS)}; "
                                      "none alone: off")
    method.add_argument("--eot_samples", type=int, help="transformed copies averaged per step with --eot")
    method.add_argument("--momentum", type=float,
                        help="PGD methods: MI-FGSM momentum (e.g. 1.0; 0: plain sign steps)")
    method.add_argument("--input_diversity", type=float,
                        help="PGD methods: probability per step of a random shrink-and-pad of the input (DI; 0: off)")
    method.add_argument("--ti_kernel", type=int,
                        help="PGD methods: smooth the gradient with a Gaussian of this odd size in pixels (TI; 0: off)")
    method.add_argument("--chroma", type=float,
                        help="PGD methods: keep this share of the perturbation's colour (the rest of the budget goes "
                             "to luminance, which JPEG keeps best; 1: off, 0: grey changes only)")
    method.add_argument("--smooth_perturbation", type=int,
                        help="PGD methods: smooth the perturbation after every step with a Gaussian of this odd size "
                             "in pixels, so it lives in the low frequencies JPEG keeps (0: off)")
    method.add_argument("--dct_keep", type=int,
                        help="PGD methods: after every step keep only the DCT coefficients (u, v) with u + v below "
                             "this in each 8 x 8 block of the perturbation, the ones JPEG quantises least (1 to 14; "
                             "0: off)")
    method.add_argument("--flat_budget", type=float,
                        help="PGD methods: the share of the budget allowed where the photo is flat (sky, walls), "
                             "rising to all of it where its texture hides the change (1: off)")
    method.add_argument("--surrogate_noise", type=float,
                        help="facelock, facecloak: each step attacks randomly perturbed copies of the face models "
                             "(weights times 1 + this times noise; e.g. 0.05), for face models never attacked (0: off)")
    method.add_argument("--landmark_jitter", type=float,
                        help="facelock: each step crops the face as another detector might (turned up to this many "
                             "degrees, moved and scaled up to this many %%; e.g. 3; 0: off)")
    method.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None,
                        help="facelock: the face model sees each face through an antialiased resize to its crop, so "
                             "the change covers the whole face and survives a resize (on with --preset small; "
                             "--no-antialias: off)")
    method.add_argument("--feature_weight", type=float,
                        help="facelock: also push the face model's middle feature map away from the clean face's, "
                             "with this weight beside the embedding's (a feature-level loss; e.g. 1; 0: off)")
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
                        help="the editor's working size: attack larger photos (and their face region) at this long "
                             "side and resize the perturbation back (0: never)")
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose error is one line on stderr (`error: ...`, exit status 2), as the scripts' other
    errors are, instead of the usage text followed by the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def create_argparser(description: str) -> argparse.ArgumentParser:
    """A parser for a script that takes the protection options, its help ending with the list of methods."""
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="defend methods:\n" + methods.describe())


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The protection options a parsed command line names (the others are None)."""
    return {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k, None) is not None}


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a script's command line: its own arguments as given, and every protection option resolved (the flags
    over the layered defaults) and checked, as attributes; `.options` holds them as `ProtectionOptions`. A set of
    options that cannot run is the parser's error (usage, one line, exit status 2)."""
    args = parser.parse_args(argv)
    try:
        options = resolve(**given(args))
    except OptionError as error:
        parser.error(str(error))
    for key, value in dataclasses.asdict(options).items():
        setattr(args, key, value)
    args.options = options
    return args


def flags(argv: Sequence[str], defend_method: str) -> dict[str, Any]:
    """The protection options named by extra command-line flags (e.g. the page's `--num_iters 50`) for
    `defend_method`; raises `OptionError` for flags that are not protection options."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_protection_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(["--defend_method", defend_method, *argv])
    except (argparse.ArgumentError, SystemExit) as error:
        raise OptionError(f"not valid protection options: {' '.join(argv)} ({error})") from None
    if unknown:
        raise OptionError(f"not protection options: {' '.join(unknown)}")
    return {k: v for k, v in given(args).items() if k != "defend_method"}
