"""Every model by name: the one place that turns a model name into a loaded model.

A name resolves, in this order, to: an explicit path where it is one (a folder, or an `.onnx` file); the copy in the
folder that `FACELOCK_ASSETS` names (laid out like the project's offline assets); the copy that ships with the
toolkit in `assets/models/` (the small models of `--preset small` and the page, packed with xz, unpacked once into
the cache and checked against their SHA-256 at every load); and last the download: a Hugging Face hub repository at
the revision this project was tested with (`HUB_REVISIONS`), or a file at a pinned URL checked against its SHA-256
(`methods.models.downloads`), cached either way. This module is the only reader of `FACELOCK_ASSETS`. Where the
network is needed and cannot be reached (or `HF_HUB_OFFLINE` is set), loading fails within seconds, with one line.
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from utils import ModelUnavailable, UserError, pick_dtype, write_json

from .downloads import PinnedFile, fetch, hub_unreachable

logger = logging.getLogger(__name__)

ASSETS_ENV = "FACELOCK_ASSETS"
#: Models with a copy in a FACELOCK_ASSETS folder, by name; the same ones ship with the toolkit, in `BUNDLED`.
LOCAL_COPIES = {
    "madebyollin/taesd": "models/taesd",
    "sface": "models/sface/model.onnx",
    "mobilefacenet": "models/mobilefacenet/model.onnx",
    "mobileface": "models/mobileface/model.onnx",
}
#: The bundled copies: a folder per model with its packed files, licence and `bundle.json` (source, SHA-256).
BUNDLED = Path(__file__).resolve().parents[2] / "assets" / "models"
#: Hugging Face repositories at the commits this project was tested with.
HUB_REVISIONS = {
    "timbrooks/instruct-pix2pix": "31519b5cb02a7fd89b906d88731cd4d6a7bbf88d",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    "runwayml/stable-diffusion-v1-5": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    "openai/clip-vit-base-patch32": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
    "madebyollin/taesd": "614f76814bbe30edbe2e627ace1c2234c81a2c0e",
    "minchul/cvlface_adaface_vit_base_kprpe_webface4m": "6530d73fb0af4d1d8287f31d559780c648ebd22a",
}
#: Editor checkpoints by --model / --target_model when --model_id is not given.
EDITOR_IDS = {"instruct-pix2pix": "timbrooks/instruct-pix2pix",
              "stable-diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
EDITOR_ID_HELP = (f"Hugging Face id or folder of the editor (default: {EDITOR_IDS['instruct-pix2pix']}, or "
                  f"{EDITOR_IDS['stable-diffusion']} for stable-diffusion)")
#: The FaceLock paper's face model (CVLFace AdaFace ViT), from the hub.
ADAFACE = "minchul/cvlface_adaface_vit_base_kprpe_webface4m"
#: Arc2Face's UNet, text encoder and ArcFace model, and the Stable Diffusion it builds on.
ARC2FACE, ARC2FACE_BASE = "FoivosPar/Arc2Face", "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: SFace of the OpenCV model zoo, at a fixed commit (the repository stores it with Git LFS).
SFACE = PinnedFile("https://github.com/opencv/opencv_zoo/raw/aeee99703db82d838f6c66b90429b0468bcedeb3/models/"
                   "face_recognition_sface/face_recognition_sface_2021dec.onnx",
                   "f6abbfff9575e3041db692c1e29d782e995191888477fd59ebc81202d99fc63b")
#: facenet-pytorch's InceptionResnetV1 VGGFace2 weights (facenet-pytorch itself downloads them unchecked).
FACENET_VGGFACE2 = PinnedFile("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
                              "20180402-114759-vggface2.pt",
                              "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b")
#: torchvision's VGG16, the backbone of LPIPS-VGG (torchvision checks only an 8-digit prefix of the hash).
VGG16 = PinnedFile("https://download.pytorch.org/models/vgg16-397923af.pth",
                   "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0")
#: torchvision's VGG19, for Flux-Guard's feature loss (torchvision publishes the first 8 digits of its SHA-256).
VGG19 = PinnedFile("https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", "dcbb9e9d")
FACE_MODELS = ("facenet", "sface", "mobilefacenet", "mobileface", "adaface")


# ------------------------------------------------------------------------------------------------- where

def assets_root() -> Path | None:
    """The folder `FACELOCK_ASSETS` names, if it is set (and not empty)."""
    root = os.environ.get(ASSETS_ENV)
    return Path(root) if root else None


def assets_faces() -> Path | None:
    """`FACELOCK_ASSETS/faces`, the labelled photos of the offline assets, where it exists."""
    root = assets_root()
    return root / "faces" if root is not None and (root / "faces").is_dir() else None


def local_copy(name: str) -> Path | None:
    """The copy of model `name` that loads without the network: the one in the FACELOCK_ASSETS folder where that
    variable is set and holds it, else the bundled one (`bundled_copy`); None for a model that only a download gives."""
    if name not in LOCAL_COPIES:
        return None
    root = assets_root()
    if root is not None and (root / LOCAL_COPIES[name]).exists():
        return root / LOCAL_COPIES[name]
    return bundled_copy(name)


def bundled_copy(name: str) -> Path | None:
    """The bundled copy of model `name`, unpacked into the cache (once) and checked against the SHA-256 its
    `bundle.json` records (at every call): the model's folder or `.onnx` file, as in `LOCAL_COPIES`. Raises
    `ModelUnavailable` for a damaged bundled file."""
    relative = Path(LOCAL_COPIES[name]).relative_to("models")
    source = BUNDLED / relative.parts[0]
    if not (source / "bundle.json").is_file():
        return None
    target = _unpacked() / relative.parts[0]
    for filename, entry in json.loads((source / "bundle.json").read_text())["files"].items():
        try:
            fetch(PinnedFile(str(source / entry.get("packed", filename)), entry["sha256"]), target / filename,
                  download=_unpack)
        except (OSError, EOFError, lzma.LZMAError) as error:
            raise ModelUnavailable(f"the bundled copy of {name} is damaged ({str(error).splitlines()[0]}); restore "
                                   f"{source} from the repository") from None
    return target / Path(*relative.parts[1:])


def _unpacked() -> Path:
    """Where bundled models are unpacked: beside the downloads in torch's hub folder (follows `TORCH_HOME`), or a
    temporary folder where that cannot be written."""
    folder = Path(torch.hub.get_dir()) / "facelock" / "bundled"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"facelock-bundled-{os.getuid() if hasattr(os, 'getuid') else 0}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _unpack(source: str, destination: str) -> None:
    """A bundled file into `destination`: decompressed where it is packed (`.xz`), else copied."""
    if not source.endswith(".xz"):
        shutil.copyfile(source, destination)
        return
    with lzma.open(source) as packed, open(destination, "wb") as out:
        shutil.copyfileobj(packed, out, 1 << 20)


def split_revision(name: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (`org/name`, revision); otherwise (name, the pinned revision or None)."""
    if "@" in name and not os.path.exists(name):
        repo, revision = name.rsplit("@", 1)
        return repo, revision
    return name, HUB_REVISIONS.get(name)


def _offline_hint(name: str) -> str:
    return ("the models of --preset small ship with the toolkit and need no network; otherwise download this one on "
            f"a connected machine (it is then cached), pass a local folder instead, or set {ASSETS_ENV} to a model "
            "folder" + (f" holding {LOCAL_COPIES[name]}" if name in LOCAL_COPIES else ""))


def from_hub(load: Callable[..., Any], what: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """`load(*args, **kwargs)` for a hub model: from the local hub cache first, then, where the hub can be reached,
    from the network. Raises `ModelUnavailable` at once, in one line naming `what`, where the hub cannot be reached
    (or `HF_HUB_OFFLINE` is set), instead of retrying for minutes."""
    try:
        with warnings.catch_warnings():  # what the hub libraries warn about a cache lookup is not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            return load(*args, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        cached = str(error).splitlines()[0]
    reason = hub_unreachable()
    if reason:
        raise ModelUnavailable(f"cannot load {what}: it is not in the local cache and the network is unreachable "
                               f"({reason}); {_offline_hint(name)}")
    try:
        return load(*args, local_files_only=False, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"cannot load {what} ({str(error).splitlines()[0] or cached}); "
                               f"{_offline_hint(name)}") from None


def checkpoints() -> Path:
    """torchvision's download cache (follows `TORCH_HOME`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# ---------------------------------------------------------------------------------------------- the hub

def load_pretrained(load: Callable[..., Any], name: str, what: str, marker: str = "config.json",
                    subfolder: str | None = None, **kwargs: Any) -> Any:
    """`load(source, ...)` for a diffusers/transformers `from_pretrained`, where `name` is a local folder, a model
    with a FACELOCK_ASSETS copy, or a hub id (the hub cache is tried before the network), loaded at its pinned
    revision (`HUB_REVISIONS`) or at the one named as `org/name@revision` (see `from_hub`). Raises
    `ModelUnavailable` naming `what` and how to get it offline."""
    source = local_copy(name) or name
    if Path(source).is_dir():
        location = Path(source) / (subfolder or "")
        if not (location / marker).is_file():
            raise ModelUnavailable(f"{location} has no {marker}; it is not a folder holding {what}")
        try:
            return load(str(location), **kwargs)
        except Exception as error:  # a truncated or foreign file: safetensors, json and torch raise their own kinds
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelUnavailable(f"cannot load {what} from {location} ({type(error).__name__}: {first}); its files "
                                   f"may be damaged or not this model's") from None
    if str(source).startswith(("/", ".", "~")) or "\\" in str(source):
        raise ModelUnavailable(f"cannot load {what}: there is no folder {source}")
    repo, revision = split_revision(str(source))
    if revision:
        kwargs["revision"] = revision
    else:
        logger.warning("%s is not pinned to a revision: loading the current one (pin it as %s@<commit>)", repo, repo)
    if subfolder:
        kwargs["subfolder"] = subfolder
    return from_hub(load, what, name, repo, **kwargs)


# ----------------------------------------------------------------------------------------- autoencoders

def load_autoencoder(spec: str | None, model_id: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers autoencoder to attack: `spec` (hub id or local folder, e.g. `madebyollin/taesd`), or by
    default the `vae` subfolder of the editor `model_id`."""
    from diffusers import AutoModel

    name, subfolder = (spec, None) if spec else (model_id, "vae")
    what = f"the autoencoder of {name}" + (f" ({subfolder}/)" if subfolder else "")
    with _quiet_legacy_config():
        vae = load_pretrained(AutoModel.from_pretrained, name, what, subfolder=subfolder, dtype=dtype)
    if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
        raise ModelUnavailable(f"{name} is a {type(vae).__name__}, not an autoencoder")
    return vae.to(device).eval()


class _LegacyConfigKeys(logging.Filter):
    """Drops diffusers' warning about TAESD's legacy `block_out_channels` config key, which it ignores."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("block_out_channels" in message and "were passed to AutoencoderTiny" in message)


class _quiet_legacy_config:
    """Within this block, diffusers' configuration logger drops `_LegacyConfigKeys`' warning."""

    logger = logging.getLogger("diffusers.configuration_utils")

    def __enter__(self) -> None:
        self.filter = _LegacyConfigKeys()
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeFilter(self.filter)


def load_editor(model: str, model_id: str, device: torch.device, dtype: str = "auto", vae: str | None = None,
                attention_slicing: bool = False, cpu_offload: bool = False, progress: bool = True):
    """The diffusers editing pipeline of `model` (instruct-pix2pix or stable-diffusion) from `model_id`, safety
    checker off as in the paper; InstructPix2Pix with Euler ancestral steps, as its pipeline card runs it. `vae`
    replaces its autoencoder; `attention_slicing` and `cpu_offload` save GPU memory."""
    from diffusers import (
        AutoPipelineForImage2Image,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
    )

    if cpu_offload and device.type == "cpu":
        raise UserError("--cpu_offload moves models to a GPU while they run; there is none here")
    weights = pick_dtype(dtype, device)
    pix2pix = model == "instruct-pix2pix"
    cls = StableDiffusionInstructPix2PixPipeline if pix2pix else AutoPipelineForImage2Image
    pipe = load_pretrained(cls.from_pretrained, model_id, f"the {model} editor {model_id}",
                           marker="model_index.json", dtype=weights, safety_checker=None,
                           requires_safety_checker=False)
    if pix2pix:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if vae:
        pipe.vae = load_autoencoder(vae, model_id, device, weights)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


# ------------------------------------------------------------------------------------------- face models

def load_face_identity(spec: str, device: torch.device, keep: str = "largest",
                       combine: str = "mean") -> torch.nn.Module:
    """Face detection, alignment and recognition for `--fr_model`: `facenet`, `sface`, `mobilefacenet`,
    `mobileface`, `adaface`, or a path to an ONNX face model (with a `model.json` contract beside it). A
    comma-separated list gives a `FaceEnsemble` of those models, each loaded once, sharing one detector, their
    similarities combined by `combine` (mean or max)."""
    from .faces import FaceDetector, FaceEnsemble, FaceIdentity

    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names or len(set(names)) < len(names):
        raise ModelUnavailable(f"--fr_model {spec!r}: name one or more different face models, comma-separated")
    detector = FaceDetector(keep=keep)
    members = [FaceIdentity(_load_face_embedder(name).to(device).eval(), detector) for name in names]
    return members[0] if len(members) == 1 else FaceEnsemble(members, combine=combine)


def _load_face_embedder(spec: str) -> torch.nn.Module:
    from .faces import load_onnx_embedder

    try:
        if spec == "facenet":
            return load_facenet()
        if spec == "adaface":
            return load_adaface()
        if spec in ("sface", "mobilefacenet", "mobileface"):
            return load_onnx_embedder(local_copy(spec) or _download_onnx_face(spec))
        if spec.endswith(".onnx"):
            return load_onnx_embedder(spec)
        raise ModelUnavailable(f"unknown face model {spec!r}; use {', '.join(FACE_MODELS)} or a path to an .onnx "
                               f"face model")
    except FileNotFoundError as error:
        raise ModelUnavailable(str(error)) from None
    except OSError as error:  # downloads: urllib's URLError, hub errors
        raise ModelUnavailable(f"cannot load face model {spec!r} ({str(error).splitlines()[0]}); "
                               f"{_offline_hint(spec)}") from None


def _download_onnx_face(name: str) -> Path:
    """SFace from the OpenCV model zoo at a pinned commit, checked against its SHA-256 and cached under torch's hub
    folder with its `model.json`."""
    if name != "sface":
        raise FileNotFoundError(f"{name} has no public download; set {ASSETS_ENV} to a folder holding "
                                f"{LOCAL_COPIES[name]} or pass the .onnx path to --fr_model")
    folder = Path(torch.hub.get_dir()) / "facelock" / name
    path = fetch(SFACE, folder / "model.onnx")
    if not (folder / "model.json").is_file():
        write_json({"name": "sface", "input_size": [112, 112], "input_range": [0, 255], "channel_order": "RGB",
                    "alignment": "arcface", "source": SFACE.url, "sha256": SFACE.sha256}, folder / "model.json")
    return path


def load_facenet():
    """InceptionResnetV1 with VGGFace2 weights. The weights are fetched (and checked against their SHA-256) into the
    folder where facenet-pytorch looks for them, so it never downloads an unchecked copy itself."""
    from facenet_pytorch import InceptionResnetV1

    from .faces import FaceEmbedder

    torch_home = Path(torch.hub.get_dir()).parent  # facenet-pytorch reads $TORCH_HOME/checkpoints
    fetch(FACENET_VGGFACE2, torch_home / "checkpoints" / FACENET_VGGFACE2.filename)
    network = InceptionResnetV1(pretrained="vggface2").eval()
    # facenet-pytorch's fixed_image_standardization: (x - 127.5) / 128 on 0..255 crops.
    return FaceEmbedder(network, size=(160, 160), input_range=(-127.5 / 128, 127.5 / 128), alignment="box",
                        name="facenet")


def load_adaface(repo_id: str = ADAFACE):
    """The FaceLock paper's CVLFace AdaFace ViT from the Hugging Face hub, at its pinned revision. It runs the
    repository's own Python code (`trust_remote_code`; a logged-in token is used if the repository asks for one).
    Takes ArcFace-aligned 112 x 112 crops in [-1, 1] and keypoints."""
    from huggingface_hub import snapshot_download
    from transformers import AutoModel

    from .faces import FaceEmbedder

    repo_id, revision = split_revision(repo_id)
    folder = from_hub(snapshot_download, "the face model adaface", repo_id, repo_id, revision=revision)
    cwd = os.getcwd()
    sys.path.insert(0, folder)
    try:
        os.chdir(folder)  # the CVLFace wrapper resolves its files relative to the working directory
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    finally:
        os.chdir(cwd)
        sys.path.remove(folder)
    return FaceEmbedder(model.eval(), size=(112, 112), input_range=(-1, 1), alignment="arcface", keypoints=True,
                        name="adaface")


# -------------------------------------------------------------------------------------- perceptual losses

def load_perceptual(spec: str, device: torch.device) -> torch.nn.Module | None:
    """FaceLock's perceptual term: `vgg` (LPIPS-VGG, as the paper) or `none`."""
    if spec == "none":
        return None
    try:
        return load_lpips_vgg().to(device)
    except FileNotFoundError as error:
        raise ModelUnavailable(str(error)) from None


def load_lpips_vgg():
    """`lpips.LPIPS(net="vgg")`, as in the paper. The VGG16 backbone is fetched into torchvision's download cache and
    checked against its SHA-256; where it cannot be had, this raises `FileNotFoundError` naming the file and folder
    instead of falling back to a randomly initialised backbone."""
    import lpips

    from .perceptual import LPIPSDistance

    checkpoint = checkpoints() / VGG16.filename
    try:
        fetch(VGG16, checkpoint)
        model = lpips.LPIPS(net="vgg", verbose=False)
    except OSError as error:  # urllib's URLError and a checksum mismatch are OSErrors
        raise FileNotFoundError(
            f"LPIPS-VGG needs torchvision's VGG16 weights {VGG16.filename} and could not download them ({error}); "
            f"put {VGG16.url} at {checkpoint} (the folder follows TORCH_HOME), or pass --lpips none"
        ) from None
    return LPIPSDistance(model.eval())


def load_vgg19_features():
    """`VGGFeatureDistance` with torchvision's ImageNet VGG19 weights, fetched into its download cache and checked
    against their hash; where they cannot be had, this raises `FileNotFoundError` naming the file and folder, never
    falling back to random weights."""
    from .perceptual import RELU3_4, VGGFeatureDistance, vgg19_relu3_4

    checkpoint = checkpoints() / VGG19.filename
    try:
        state = torch.load(fetch(VGG19, checkpoint), map_location="cpu", weights_only=True)
    except OSError as error:  # urllib's URLError and a checksum mismatch are OSErrors
        raise FileNotFoundError(
            f"the VGG19 feature loss needs torchvision's weights {VGG19.filename} and could not download them "
            f"({error}); put {VGG19.url} at {checkpoint} (the folder follows TORCH_HOME), or choose another "
            f"perceptual loss"
        ) from None
    layers = vgg19_relu3_4()
    layers.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                            if k.startswith("features.") and int(k.split(".")[1]) < RELU3_4})
    return VGGFeatureDistance(layers.eval())


def load_guard_perceptual(spec: str, device: torch.device) -> torch.nn.Module | None:
    """Flux-Guard's perceptual loss: `vgg19` (the paper's relu3_4 feature MSE), `lpips` (LPIPS-VGG) or `none`."""
    if spec == "vgg19":
        try:
            return load_vgg19_features().to(device)
        except FileNotFoundError as error:
            raise ModelUnavailable(f"{error} (--guard_perceptual lpips or none)") from None
    return load_perceptual("vgg" if spec == "lpips" else "none", device)


# ------------------------------------------------------------------------------------------------ Arc2Face

def load_arc2face(detector, device: torch.device, dtype: torch.dtype, base_model: str = ARC2FACE_BASE):
    """Arc2Face from the hub: its UNet and text encoder (`FoivosPar/Arc2Face`), the rest of Stable Diffusion 1.5
    from `base_model`, DPM-Solver, and its ArcFace model (`arcface.onnx`, RGB in [-1, 1], ArcFace alignment)."""
    import onnx2torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from huggingface_hub import hf_hub_download
    from transformers import CLIPTextModel

    from .arc2face import Arc2Face
    from .faces import FaceEmbedder, FaceIdentity

    what = f"Arc2Face ({ARC2FACE} and {base_model})"
    encoder = from_hub(CLIPTextModel.from_pretrained, what, ARC2FACE, ARC2FACE, subfolder="encoder", dtype=dtype)
    unet = from_hub(UNet2DConditionModel.from_pretrained, what, ARC2FACE, ARC2FACE, subfolder="arc2face",
                    dtype=dtype)
    pipeline = from_hub(StableDiffusionPipeline.from_pretrained, what, base_model, base_model, text_encoder=encoder,
                        unet=unet, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    network = onnx2torch.convert(from_hub(hf_hub_download, what, ARC2FACE, ARC2FACE, "arcface.onnx")).eval()
    embedder = FaceEmbedder(network, size=(112, 112), input_range=(-1.0, 1.0), alignment="arcface", name="arcface")
    return Arc2Face(pipeline.to(device), FaceIdentity(embedder.to(device), detector))
