"""What the timing benchmarks run on where the real thing is not needed: full-size random stand-ins of the hub
models (time and memory do not depend on the weights), and the bundled portrait at any size."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from PIL import Image

from utils import load_image, pil_to_tensor

#: The bundled example portrait.
PORTRAIT = Path(__file__).resolve().parents[2] / "assets" / "astronaut.png"
#: diffusers' AutoencoderKL config of Stable Diffusion 1.5 (the VAE InstructPix2Pix uses too).
SD15_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
#: Stable Diffusion 1.5's UNet config with InstructPix2Pix's 8 input channels (noisy latent + photo latent).
IP2P_UNET = dict(sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
#: Stable Diffusion 1.5's text encoder (CLIP ViT-L/14's).
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


class StandInTokenizer:
    """Every prompt becomes 77 tokens, so the text encoder runs at full length."""

    model_max_length = 77

    def __call__(self, texts: Sequence[str], **kwargs) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.zeros(len(texts), self.model_max_length, dtype=torch.long))


def sd15_vae(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Stable Diffusion 1.5's VAE architecture with random weights (seeded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE).eval().to(device=device, dtype=dtype)


def portrait(size: int, device: torch.device) -> torch.Tensor:
    """The bundled portrait resized to `size` x `size`, `1 x 3 x size x size` in `[-1, 1]`."""
    return pil_to_tensor(load_image(PORTRAIT).resize((size, size), Image.LANCZOS)).to(device)
