"""HEIC/HEIF photos, as phones take them, are read like any other photo (pillow-heif)."""

from __future__ import annotations

import numpy as np
from PIL import Image

import defend
from conftest import write_photo
from utils import image_size, list_images, load_image, read_heif


def write_heic(path, size=(96, 80), seed=0):
    assert read_heif()
    png = write_photo(path.with_suffix(".png"), size=size, seed=seed)
    smooth = Image.open(png).resize((size[0] // 8, size[1] // 8)).resize(size, Image.BILINEAR)  # codec-friendly
    smooth.save(path, format="HEIF", quality=95)
    return path, np.asarray(smooth)


def test_a_heic_photo_loads_as_rgb_at_its_size(tmp_path):
    path, pixels = write_heic(tmp_path / "phone.heic")
    image = load_image(path)
    assert (image.mode, image.size, image_size(path)) == ("RGB", (96, 80), (96, 80))
    assert np.abs(np.asarray(image).astype(int) - pixels).mean() < 6  # lossy, but the same picture
    assert path in list_images(tmp_path)


def test_defend_protects_a_heic_photo_into_a_png(tmp_path, tiny_vae_dir, capsys):
    path, _ = write_heic(tmp_path / "IMG_0001.HEIC", size=(72, 64))
    assert defend.main(["--input_path", str(path), "--defend_method", "encoder", "--vae", str(tiny_vae_dir),
                        "--num_iters", "2", "--attack_budget", "0.03"]) == 0
    protected = np.asarray(Image.open(tmp_path / "IMG_0001_protected.png"))
    clean = np.asarray(load_image(path))
    assert protected.shape == clean.shape == (64, 72, 3)
    assert np.abs(protected.astype(int) - clean.astype(int)).max() <= 3
