"""CLIP-S and CLIP-I between an edit and its source photo, as the FaceLock code computes them with
`openai/clip-vit-base-patch32`: CLIP-S is the cosine between `E_img(edit) - E_img(source)` and `E_txt(prompt)`,
CLIP-I the cosine between `E_img(edit)` and `E_img(source)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils import tensor_to_uint8

from .base import SourceMetric

CLIP_MODEL = "openai/clip-vit-base-patch32"


class ClipEmbedder:
    """A transformers `CLIPModel` with its `CLIPProcessor` (which resizes and crops as CLIP was trained)."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model.eval(), processor
        self.device = next(model.parameters()).device
        self._texts: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(output) -> torch.Tensor:
        return (output if isinstance(output, torch.Tensor) else output.pooler_output).float().cpu()

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        pictures = [tensor_to_uint8(image) for image in images]
        inputs = self.processor(images=pictures, return_tensors="pt").to(self.device)
        return self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    @torch.no_grad()
    def text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._texts:
            inputs = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True).to(self.device)
            self._texts[prompt] = self._features(self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))[0]
        return self._texts[prompt]


class ClipS(SourceMetric):
    key, title, lower_is_stronger = "clip_s", "CLIP-S", True

    def __init__(self, embedder: ClipEmbedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.prompt = ""

    def embed_sources(self, images: torch.Tensor) -> list:
        return list(self.embedder.images(images))

    def set_prompt(self, prompt: str) -> None:
        self.prompt = prompt

    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        sources = torch.stack([self.sources[name] for name in names])
        delta = self.embedder.images(edits) - sources
        return F.cosine_similarity(delta, self.embedder.text(self.prompt)[None], dim=-1)


class ClipI(ClipS):
    key, title, lower_is_stronger = "clip_i", "CLIP-I", True

    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        sources = torch.stack([self.sources[name] for name in names])
        return F.cosine_similarity(self.embedder.images(edits), sources, dim=-1)
