"""Arc2Face: new photos of a person generated from their ArcFace embedding, FaceCloak's synthetic training faces.

Arc2Face ("Arc2Face: A Foundation Model for ID-Consistent Human Faces", Paraperas Papantoniou et al., ECCV 2024,
https://arxiv.org/abs/2403.11641; weights `FoivosPar/Arc2Face` on the Hugging Face hub) is Stable Diffusion 1.5 with
its own UNet and text encoder: the normalised 512-d ArcFace embedding of a face takes the place of the token "id"
in the prompt "photo of a id person", and the pipeline draws new photos of that person (other poses, lighting,
expressions). FaceCloak learns its mask over the person's photos plus 8 such images (DPM-Solver, 25 steps,
guidance 3, 512 px). It needs the hub and, in practice, a GPU; offline, FaceCloak's variations come from
`methods.transforms` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .faces import FaceIdentity

PROMPT, TOKEN = "photo of a id person", "id"


class Arc2Face:
    """Generates photos of the person in a photo.

    Args:
        pipeline: a diffusers `StableDiffusionPipeline` with Arc2Face's UNet and text encoder.
        identity: the ArcFace model whose embeddings the pipeline was trained on (`FaceIdentity`: detector,
            alignment, embedder).
        steps, guidance, size: sampling steps, classifier-free guidance scale and image side.

    Example::

        arc2face = loading.load_arc2face(detector, device, torch.float16)
        faces = arc2face.generate(photo, 8, torch.Generator("cuda").manual_seed(0))  # 8 x 3 x 512 x 512, [-1, 1]
    """

    def __init__(self, pipeline, identity: FaceIdentity, steps: int = 25, guidance: float = 3.0,
                 size: int = 512) -> None:
        self.pipeline, self.identity = pipeline, identity
        self.steps, self.guidance, self.size = steps, guidance, size

    def prompt_embeds(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The text encoder's output for "photo of a id person" with each (unit) embedding in place of the token
        "id"'s input embedding, zero-padded to the encoder's width."""
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        token = tokenizer.encode(TOKEN, add_special_tokens=False)
        if len(token) != 1:
            raise ValueError(f"the tokenizer splits {TOKEN!r} into {len(token)} tokens; Arc2Face needs one")
        width = encoder.config.hidden_size
        if embeddings.shape[1] > width:
            raise ValueError(f"a {embeddings.shape[1]}-d identity does not fit the text encoder's {width} dimensions")
        ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.repeat(len(embeddings), 1).to(encoder.device)
        where = ids == token[0]
        padded = F.pad(embeddings, (0, width - embeddings.shape[1]))

        def swap(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[where] = padded.to(output)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            return encoder(ids)[0]
        finally:
            handle.remove()

    @torch.no_grad()
    def generate(self, photo: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`count` new photos (`count x 3 x size x size` in `[-1, 1]`) of the largest face in `photo`
        (`1 x 3 x H x W` in `[-1, 1]`); empty if it shows no face."""
        embeddings, _, _ = self.identity.embed(photo.to(next(self.identity.parameters()).device))
        if len(embeddings) == 0:
            return photo.new_zeros((0, 3, self.size, self.size))
        embeds = self.prompt_embeds(embeddings[:1])
        images = self.pipeline(prompt_embeds=embeds.to(self.pipeline.unet.dtype), num_inference_steps=self.steps,
                               guidance_scale=self.guidance, num_images_per_prompt=count, height=self.size,
                               width=self.size, generator=generator, output_type="pt").images
        return (images.float().clamp(0, 1) * 2 - 1).to(photo.device)
