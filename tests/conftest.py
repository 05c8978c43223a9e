"""Shared fixtures: tiny seeded models (seconds, no download) and the real assets of FACELOCK_ASSETS."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from methods.models.faces import FaceEmbedder, FaceIdentity, Faces  # noqa: E402
from methods.models.perceptual import LPIPSDistance  # noqa: E402

# the README runs two pytest-xdist workers (-n 2) on 2-core machines: a core each, not both fighting over both
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def tiny_autoencoder_kl():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=32,
    ).eval()


def tiny_autoencoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()


AUTOENCODERS = {"kl": tiny_autoencoder_kl, "tiny": tiny_autoencoder_tiny}


class TinyFaceNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, stride=2),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 32),
        )

    def forward(self, x):
        return self.layers(x)


def centre_faces(images: torch.Tensor) -> Faces:
    """A stand-in detector: one face in the middle of every image, with plausible landmarks."""
    n, _, height, width = images.shape
    template = torch.tensor([[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]])
    landmarks = (template * torch.tensor([width, height])).expand(n, 5, 2).clone()
    boxes = torch.tensor([[0.2 * width, 0.2 * height, 0.8 * width, 0.9 * height]]).expand(n, 4).clone()
    return Faces(index=torch.arange(n), boxes=boxes, landmarks=landmarks, count=n)


def tiny_face_identity() -> FaceIdentity:
    return FaceIdentity(FaceEmbedder(TinyFaceNet().eval(), size=(32, 32), input_range=(-1, 1)), centre_faces)


@functools.lru_cache(maxsize=1)
def tiny_lpips() -> LPIPSDistance:
    """LPIPS with its real linear layers (shipped in the lpips wheel) over a randomly initialised VGG; shared
    between tests, as building VGG16 takes seconds (attacks restore its flags)."""
    import lpips

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LPIPSDistance(lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval())


def random_images(n: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 1.8 - 0.9


def export_tiny_onnx_face_model(folder: Path) -> Path:
    """A random face model as ONNX with a model.json contract, as laid out in FACELOCK_ASSETS."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyFaceNet().eval(), (torch.rand(1, 3, 112, 112),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    (folder / "model.json").write_text(json.dumps({"name": "tiny", "input_size": [112, 112],
                                                   "input": "float32 RGB in 0..255"}))
    return path


def write_photo(path: Path, size=(96, 80), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture
def tiny_vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_vae")
    tiny_autoencoder_tiny().save_pretrained(folder)
    return folder


def tiny_clip_text(vocabulary_size: int | None = None):
    """A tiny CLIP text encoder and a character-level CLIP tokenizer built from a local vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(
        ["<|startoftext|>", "<|endoftext|>", "!", *characters, *(c + "</w>" for c in characters)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)
    torch.manual_seed(3)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, vocab_size=len(vocab), hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    return CLIPTextModel(config).eval(), tokenizer


def tiny_clip(folder: Path | None = None):
    """A tiny random `CLIPModel` with a processor (32-pixel crops, local vocabulary); saved to `folder` if given."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    _, tokenizer = tiny_clip_text()
    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    if folder is not None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return model, processor


def tiny_pipeline(pix2pix: bool = True):
    """A tiny InstructPix2Pix (UNet with 8 input channels, Euler ancestral as edit.py uses) or img2img pipeline."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8 if pix2pix else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    text_encoder, tokenizer = tiny_clip_text()
    components = dict(vae=tiny_autoencoder_kl(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if pix2pix:
        pipe = StableDiffusionInstructPix2PixPipeline(scheduler=EulerAncestralDiscreteScheduler(), **components)
    else:
        pipe = StableDiffusionImg2ImgPipeline(scheduler=PNDMScheduler(skip_prk_steps=True), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_editor(folder: Path, pix2pix: bool = True) -> Path:
    """A tiny InstructPix2Pix or img2img pipeline (`tiny_pipeline`), saved to `folder`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_pipeline(pix2pix).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pix2pix_dir(tmp_path_factory) -> Path:
    return tiny_editor(tmp_path_factory.mktemp("pix2pix"))


@pytest.fixture(scope="session")
def tiny_img2img_dir(tmp_path_factory) -> Path:
    return tiny_editor(tmp_path_factory.mktemp("img2img"), pix2pix=False)


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real models and faces of FACELOCK_ASSETS; tests that need them skip where it is unset."""
    root = os.environ.get("FACELOCK_ASSETS")
    if not root:
        pytest.skip("FACELOCK_ASSETS is not set (real weights and faces; .ci/run sets it)")
    path = Path(root)
    if not (path / "models").is_dir():
        pytest.fail(f"FACELOCK_ASSETS={root} has no models/ folder")
    return path
