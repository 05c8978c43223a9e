"""Arc2Face's mechanics with tiny random components (the real weights come from the hub and need a GPU)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import defend
import methods.models.loading
from conftest import centre_faces, random_images, tiny_autoencoder_kl, tiny_face_identity, write_photo
from methods.facecloak import FaceCloak
from methods.models.arc2face import PROMPT, Arc2Face
from methods.pipeline import options as protection_options
from methods.pipeline import protect


def tiny_text():
    """A tiny CLIP text encoder whose tokenizer knows "id" as one token."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(
        ["<|startoftext|>", "<|endoftext|>", "!", *characters, *(c + "</w>" for c in characters), "id</w>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("i", "d</w>")], pad_token="!", model_max_length=77)
    torch.manual_seed(3)
    encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                           vocab_size=max(vocab.values()) + 1, hidden_size=32, intermediate_size=37,
                                           num_attention_heads=4, num_hidden_layers=2)).eval()
    return tokenizer, encoder


def tiny_arc2face(size: int = 32) -> Arc2Face:
    """Stable Diffusion in miniature with that text encoder, and a 32-d tiny face model."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, encoder = tiny_text()
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=size // 4,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = StableDiffusionPipeline(vae=tiny_autoencoder_kl(), text_encoder=encoder, tokenizer=tokenizer,
                                           unet=unet, scheduler=DPMSolverMultistepScheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return Arc2Face(pipeline, tiny_face_identity(), steps=2, size=size)


def test_the_identity_takes_the_place_of_the_token_id():
    tokenizer, encoder = tiny_text()
    arc2face = Arc2Face(SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder), tiny_face_identity())
    identity = torch.nn.functional.normalize(torch.randn(2, 20, generator=torch.Generator().manual_seed(0)), dim=1)
    seen = []  # what the transformer's first layer receives: token plus position embeddings
    modules = {name.split(".", 1)[-1] if name.startswith("text_model.") else name: m
               for name, m in encoder.named_modules()}  # transformers 5 dropped the text_model level
    layer = modules["encoder.layers.0"]
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        embeds = arc2face.prompt_embeds(identity)
    finally:
        handle.remove()
    assert embeds.shape == (2, 77, 32) and not torch.allclose(embeds[0], embeds[1])
    ids = torch.tensor(tokenizer(PROMPT, padding="max_length", max_length=77).input_ids)
    position = int((ids == tokenizer.encode("id", add_special_tokens=False)[0]).nonzero())
    with torch.no_grad():
        expected = encoder.get_input_embeddings()(ids).repeat(2, 1, 1)
        expected[:, position] = torch.nn.functional.pad(identity, (0, 12))
        expected = expected + modules["embeddings.position_embedding"].weight[:77]
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert encoder.get_input_embeddings()._forward_hooks == {}  # the swap is undone
    with pytest.raises(ValueError, match="does not fit"):
        arc2face.prompt_embeds(torch.randn(1, 64))


def test_generated_photos_are_seeded_in_range_and_feed_the_mask_learning(monkeypatch, tmp_path):
    arc2face = tiny_arc2face()
    photo = random_images(1, 64, seed=1)
    first = arc2face.generate(photo, 2, torch.Generator().manual_seed(0))
    assert first.shape == (2, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, arc2face.generate(photo, 2, torch.Generator().manual_seed(0)))
    assert not torch.equal(first[0], first[1])

    monkeypatch.setattr(methods.models.loading, "load_arc2face", lambda detector, device, dtype: arc2face)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for seed, name in enumerate(("x.png", "y.png", "z.png")):
        write_photo(gallery / name, size=(80, 80), seed=seed)
    me = write_photo(tmp_path / "me.png", size=(96, 96), seed=7)
    args = protection_options.parse(defend.build_parser(), ["--input_path", str(me), "--defend_method", "facecloak",
                                                     "--gallery", str(gallery), "--arc2face", "2", "--num_iters", "1",
                                                     "--variations", "0"])
    attack = FaceCloak(tiny_face_identity(), detector=centre_faces, num_iters=1, variations=0)
    provenance = protect.learn_mask(args.options, attack, [me], tmp_path / "mask.safetensors")
    assert provenance["synthetic"] == 2 and provenance["photos"] == 3 and provenance["learned_from"] == [str(me)]
