"""PhotoGuard's diffusion attack: back-propagate through a short run of the editor itself."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Iterator

import torch
from torch import nn

from .base import PGDAttack
from .models.autoencoder import as_autoencoder
from .randomness import Generators, normal_noise, per_sample_generators
from .registry import register


@contextlib.contextmanager
def gradient_checkpointing(*models: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Diffusers' gradient checkpointing on `models` for the duration (each block's activations are recomputed in
    the backward pass instead of stored; it acts whenever gradients are on, in eval mode too); restored on exit."""
    switched = [m for m in models if enabled and getattr(m, "_supports_gradient_checkpointing", False)
                and not m.is_gradient_checkpointing]
    for model in switched:
        model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for model in switched:
            model.disable_gradient_checkpointing()


class DiffusionEditor(nn.Module):
    """The parts of a diffusers editing pipeline that the diffusion attack differentiates through, run the way the
    pipeline runs them: InstructPix2Pix (a UNet that also takes the photo's latent; generation from noise with text
    and image guidance) or Stable Diffusion img2img (the photo's latent noised to `strength`, text guidance).

    The scheduler is a private copy of the pipeline's (Euler ancestral for InstructPix2Pix as `edit.py` sets it).
    Random draws (the starting noise, the ancestral noise of each step) come from one generator per image. The
    photo's latent is the autoencoder's posterior mean (InstructPix2Pix takes the mode too; img2img samples).
    Computation happens in the UNet's dtype, float32 at least between its calls.
    """

    def __init__(self, pipeline) -> None:
        super().__init__()
        self.autoencoder = as_autoencoder(pipeline.vae)
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler = copy.deepcopy(pipeline.scheduler)  # from_config would drop what the pipeline corrected
        config = pipeline.vae.config
        self.scaling_factor = getattr(config, "scaling_factor", 1.0)
        self.latent_channels = config.latent_channels
        channels = self.unet.config.in_channels
        if channels not in (self.latent_channels, 2 * self.latent_channels):
            raise ValueError(f"a UNet with {channels} input channels is neither InstructPix2Pix's "
                             f"({2 * self.latent_channels}) nor img2img's ({self.latent_channels})")
        self.instruct = channels == 2 * self.latent_channels

    def guided(self, guidance_scale: float, image_guidance_scale: float) -> bool:
        """Whether the pipeline would use classifier-free guidance with these scales."""
        return guidance_scale > 1 and (image_guidance_scale >= 1 if self.instruct else True)

    @torch.no_grad()
    def embeddings(self, prompt: str, n: int, guided: bool) -> torch.Tensor:
        """The text conditioning of `n` images, in the order the pipeline batches it: InstructPix2Pix (prompt,
        empty, empty), img2img (empty, prompt), or the prompt alone without guidance."""
        def encode(text: str) -> torch.Tensor:
            ids = self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            return self.text_encoder(ids.to(self.text_encoder.device))[0].expand(n, -1, -1)

        if not guided:
            parts = [encode(prompt)]
        else:
            empty = encode("")
            parts = [encode(prompt), empty, empty] if self.instruct else [empty, encode(prompt)]
        return torch.cat(parts).to(self.unet.dtype)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor, steps: int, guidance_scale: float,
                image_guidance_scale: float, strength: float, generator: Generators = None) -> torch.Tensor:
        """Edit the images `x` (`[-1, 1]`) with `steps` denoising steps and return the decoded result,
        differentiably in `x`."""
        n = len(x)
        guided = self.guided(guidance_scale, image_guidance_scale)
        dtype = torch.promote_types(self.unet.dtype, torch.float32)
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=x.device)
        if self.instruct:
            conditioning = self.autoencoder.encode(x).to(dtype)
            if guided:
                conditioning = torch.cat([conditioning, conditioning, torch.zeros_like(conditioning)])
            timesteps = scheduler.timesteps
            latents = normal_noise(conditioning[:n], generator) * scheduler.init_noise_sigma
        else:
            start = steps - min(int(steps * strength), steps)
            timesteps = scheduler.timesteps[start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            latents = self.scaling_factor * self.autoencoder.encode(x).to(dtype)
            latents = scheduler.add_noise(latents, normal_noise(latents, generator), timesteps[:1].repeat(n))
        generators = per_sample_generators(generator, n)
        options = {}
        if "generator" in inspect.signature(scheduler.step).parameters and all(g is not None for g in generators):
            options["generator"] = generators
        copies = 3 if self.instruct else 2
        for t in timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * copies) if guided else latents, t)
            if self.instruct:
                model_input = torch.cat([model_input, conditioning], dim=1)
            noise = self.unet(model_input.to(self.unet.dtype), t, encoder_hidden_states=embeddings).sample.to(dtype)
            if guided and self.instruct:
                text, image, unconditional = noise.chunk(3)
                noise = (unconditional + guidance_scale * (text - image)
                         + image_guidance_scale * (image - unconditional))
            elif guided:
                unconditional, text = noise.chunk(2)
                noise = unconditional + guidance_scale * (text - unconditional)
            latents = scheduler.step(noise, t, latents, **options, return_dict=False)[0]
        return self.autoencoder.decode(latents / self.scaling_factor)


@register
class DiffusionAttack(PGDAttack):
    """PhotoGuard's diffusion attack ("Raising the Cost of Malicious AI-Powered Image Editing", Salman et al.,
    ICML 2023, https://arxiv.org/abs/2302.06588; official notebook MadryLab/photoguard
    `notebooks/demo_complex_attack_inpainting.ipynb`).

    Runs the editor the user protects against for `steps` denoising steps, with its guidance, from noise drawn
    from each image's generator, and descends the L2 distance between the decoded result and `target` (default
    0: a grey image), back-propagating through every step to the photo. Each step's gradient is the mean over
    `grad_reps` such stochastic generations. The UNet and the autoencoder recompute their activations in the
    backward pass (`gradient_checkpointing`, on by default): with float16 weights on a GPU this is what brings a
    512-pixel photo under 20 GB.

    Threat model: L-infinity, `eps` in `[-1, 1]` units, sign steps (the project's budget); `norm="l2"` with eps 16
    and step 1 is the official notebook's L2 attack (steps on the L2-normalised gradient, projection by
    rescaling). Defaults: eps 0.03, step_size 0.01, num_iters 200, steps 4, grad_reps 10, guidance_scale 7.5,
    image_guidance_scale 1.5 (InstructPix2Pix), strength 0.5 (img2img: `int(steps * strength)` of the steps run,
    as in the pipeline), the empty prompt (the protector does not know the attacker's instruction).

    Models:
        editor: a diffusers `StableDiffusionInstructPix2PixPipeline` or `StableDiffusionImg2ImgPipeline` (or a
            `DiffusionEditor` made from one).

    Example::

        attack = DiffusionAttack(pipe, steps=4, grad_reps=10)
        protected = attack(images, generator=[torch.Generator().manual_seed(s) for s in seeds])
    """

    name = "diffusion"
    summary = "PhotoGuard diffusion attack: drive a short run of the editor itself toward a grey image"
    models = ("editor",)

    def __init__(self, editor, steps: int = 4, grad_reps: int = 10, guidance_scale: float = 7.5,
                 image_guidance_scale: float = 1.5, strength: float = 0.5, prompt: str = "",
                 target: float | torch.Tensor = 0.0, gradient_checkpointing: bool = True, num_iters: int = 200,
                 **options) -> None:
        super().__init__(num_iters=num_iters, **options)
        self.editor = editor if isinstance(editor, DiffusionEditor) else DiffusionEditor(editor)
        if steps < 1 or grad_reps < 1 or not 0 < strength <= 1:
            raise ValueError(f"need steps >= 1, grad_reps >= 1 and strength in (0, 1], got {steps}, {grad_reps} "
                             f"and {strength}")
        if not self.editor.instruct and int(steps * strength) < 1:
            raise ValueError(f"img2img runs int(steps * strength) steps: none with steps {steps}, strength {strength}")
        self.steps, self.grad_reps, self.strength = steps, grad_reps, strength
        self.guidance_scale, self.image_guidance_scale = guidance_scale, image_guidance_scale
        self.prompt, self.target = prompt, target
        self.gradient_checkpointing = gradient_checkpointing
        self.generators: Generators = None  # the per-image generators of the call in progress

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        self.generators = generator
        try:
            with gradient_checkpointing(self.editor.unet, self.editor.autoencoder.vae,
                                        enabled=self.gradient_checkpointing):
                return super().perturb(x, generator)
        finally:
            self.generators = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        guided = self.editor.guided(self.guidance_scale, self.image_guidance_scale)
        return self.editor.embeddings(self.prompt, len(x), guided)

    def value_and_grad(self, x_adv: torch.Tensor, reference: torch.Tensor, i: int, generators: list,
                       clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's value and gradient, averaged over `grad_reps` generations (one graph at a time)."""
        value, grad = 0, 0
        for _ in range(self.grad_reps):
            sample, sample_grad = super().value_and_grad(x_adv, reference, i, generators, clean)
            value, grad = value + sample, grad + sample_grad
        return value / self.grad_reps, grad / self.grad_reps

    def objective(self, x_adv: torch.Tensor, embeddings: torch.Tensor, i: int) -> torch.Tensor:
        """Minus the L2 distance of the edit to the target. The generation's noise comes from the generators of the
        call in progress (outside a call, from torch's global generator)."""
        edited = self.editor(x_adv, embeddings, self.steps, self.guidance_scale, self.image_guidance_scale,
                             self.strength, self.generators).float()
        target = torch.as_tensor(self.target, dtype=edited.dtype, device=edited.device)
        return -(edited - target).flatten(1).norm(dim=1)
