"""One view of any diffusers autoencoder: images in `[-1, 1]` to latents and back, differentiably."""

from __future__ import annotations

import torch
from torch import nn


class LatentAutoencoder(nn.Module):
    """Wraps `AutoencoderKL` (the latent is the posterior mean, as in the FaceLock code) or `AutoencoderTiny`.

    Inputs are cast to the autoencoder's own dtype and memory format, so a float16 VAE on a GPU or a
    channels-last VAE on a CPU takes the same float32 images. The tiny autoencoder's `forward` quantises its
    latents to bytes, which would cut the gradient, so only `encode` and `decode` are ever used.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise TypeError(f"{type(vae).__name__} is not an autoencoder with encode() and decode()")
        self.vae = vae

    def _input(self, t: torch.Tensor) -> torch.Tensor:
        kernel = next(p for p in self.vae.parameters() if p.ndim == 4)
        t = t.to(kernel.dtype)
        if kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(self._input(x))
        return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._input(z)).sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def as_autoencoder(vae: nn.Module) -> LatentAutoencoder:
    return vae if isinstance(vae, LatentAutoencoder) else LatentAutoencoder(vae)
