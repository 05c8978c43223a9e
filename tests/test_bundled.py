"""The small models that ship with the toolkit (assets/models/), the order in which a model name is looked up, and
how loading fails where the network cannot be reached. These tests need neither FACELOCK_ASSETS nor the network."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, export_tiny_onnx_face_model
from methods.models import downloads, loading
from methods.models.downloads import sha256_of
from utils import ModelUnavailable

BUNDLED_NAMES = ("madebyollin/taesd", "sface", "mobilefacenet", "mobileface")


@pytest.fixture
def no_assets(monkeypatch, tmp_path):
    """FACELOCK_ASSETS unset and an empty torch cache, so that every model comes from the bundled copies."""
    monkeypatch.delenv("FACELOCK_ASSETS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_every_bundled_model_has_its_licence_source_and_checksums_and_the_bundle_stays_lean():
    total = 0
    for name in BUNDLED_NAMES:
        folder = loading.BUNDLED / loading.LOCAL_COPIES[name].split("/")[1]
        bundle = json.loads((folder / "bundle.json").read_text())
        assert bundle["licence"] in ("MIT", "Apache-2.0") and bundle["source"]
        assert (folder / bundle["licence_file"]).read_text().strip()
        for filename, entry in bundle["files"].items():
            stored = folder / entry.get("packed", filename)
            assert len(entry["sha256"]) == 64 and stored.is_file()
            if "packed" in entry:
                assert sha256_of(stored) == entry["packed_sha256"]
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 40e6


def test_bundled_models_unpack_to_their_checksums_and_are_repaired_when_damaged(no_assets):
    for name in BUNDLED_NAMES:  # each unpacked file is checked against the SHA-256 its bundle.json records
        assert loading.local_copy(name).is_relative_to(no_assets)
    path = loading.local_copy("mobileface")
    assert path.name == "model.onnx" and no_assets in path.parents
    bundle = json.loads((loading.BUNDLED / "mobileface" / "bundle.json").read_text())
    assert sha256_of(path) == bundle["files"]["model.onnx"]["sha256"]
    assert (path.parent / "model.json").is_file()
    path.write_bytes(b"bit rot")  # a damaged cached copy is unpacked again
    assert sha256_of(loading.local_copy("mobileface")) == bundle["files"]["model.onnx"]["sha256"]
    folder = loading.local_copy("madebyollin/taesd")
    assert folder.is_dir() and (folder / "config.json").is_file()


def test_a_damaged_bundled_file_is_one_clear_error(no_assets, monkeypatch, tmp_path):
    damaged = tmp_path / "bundle"
    (damaged / "mobileface").mkdir(parents=True)
    source = loading.BUNDLED / "mobileface"
    for item in source.iterdir():
        (damaged / "mobileface" / item.name).write_bytes(item.read_bytes())
    packed = damaged / "mobileface" / "model.onnx.xz"
    packed.write_bytes(packed.read_bytes()[:50_000])  # truncated
    monkeypatch.setattr(loading, "BUNDLED", damaged)
    with pytest.raises(ModelUnavailable, match="bundled copy of mobileface is damaged"):
        loading.local_copy("mobileface")


def test_a_name_is_looked_up_as_a_path_then_in_facelock_assets_then_in_the_bundle(no_assets, monkeypatch, tmp_path):
    assets = tmp_path / "assets"
    explicit = export_tiny_onnx_face_model(tmp_path / "explicit")
    own = export_tiny_onnx_face_model(assets / "models" / "mobileface")
    assert loading.local_copy("mobileface").is_relative_to(no_assets / "torch")  # the bundle: no variable set
    monkeypatch.setenv("FACELOCK_ASSETS", str(assets))
    assert loading.local_copy("mobileface") == own  # FACELOCK_ASSETS before the bundle
    assert loading.local_copy("sface").is_relative_to(no_assets / "torch")  # ... where it holds the model
    embedder = loading._load_face_embedder(str(explicit))  # an explicit path before both
    assert embedder.name == "tiny"
    assert loading.local_copy("facenet") is None  # only a download has it


def test_the_unreachable_hub_fails_at_once_without_trying_the_network(monkeypatch):
    calls = []

    def load(source, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise OSError("not in the cache")

    refused = urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(downloads.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(refused))
    downloads.unreachable.cache_clear()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    try:
        with pytest.raises(ModelUnavailable) as raised:
            loading.load_pretrained(load, "someone/editor@abc", "the editor someone/editor")
    finally:
        downloads.unreachable.cache_clear()
    message = str(raised.value)
    assert calls == [True]  # the cache only: the network was never asked to download
    assert "\n" not in message and "the editor someone/editor" in message and "network is unreachable" in message
    assert "--preset small" in message


def test_an_answering_host_is_reachable_even_with_an_error_page(monkeypatch):
    def answered(*args, **kwargs):
        raise urllib.error.HTTPError("https://example.org/", 403, "Forbidden", {}, None)

    monkeypatch.setattr(downloads.urllib.request, "urlopen", answered)
    downloads.unreachable.cache_clear()
    try:
        assert downloads.unreachable("https://example.org/some/file") is None
    finally:
        downloads.unreachable.cache_clear()


def test_a_hub_only_configuration_offline_ends_in_one_line_naming_the_model(tmp_path):
    photo = tmp_path / "me.png"
    Image.open(ROOT / "assets" / "astronaut.png").convert("RGB").resize((128, 128)).save(photo)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, str(ROOT / "defend.py"), "--input_path", str(photo), "--defend_method",
                          "facelock"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2 and not (tmp_path / "me_protected.png").exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: cannot load the autoencoder of timbrooks/instruct-pix2pix")
    assert "network is unreachable" in lines[0] and "--preset small" in lines[0]


def test_the_quick_start_protects_the_astronaut_offline_with_the_bundled_models(tmp_path):
    """The README's first command, offline and without FACELOCK_ASSETS, fewer iterations: the bundled TAESD and
    SFace lower SFace's similarity of the round trip far below what noise of the same budget leaves."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    source = tmp_path / "astronaut.png"
    source.write_bytes((ROOT / "assets" / "astronaut.png").read_bytes())
    common = [sys.executable, str(ROOT / "defend.py"), "--input_path", str(source), "--preset", "small",
              "--num_iters", "30"]
    run = subprocess.run([*common, "--defend_method", "facelock"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    assert "Retrying" not in run.stderr and "block_out_channels" not in run.stderr
    noise = subprocess.run([*common, "--defend_method", "noise", "--output_path", str(tmp_path / "noise.png")],
                           capture_output=True, text=True, env=env, timeout=900)
    assert noise.returncode == 0, noise.stderr

    from methods.models.autoencoder import as_autoencoder
    from utils import load_image, pil_to_tensor

    with pytest.MonkeyPatch.context() as patch:  # judged by the same bundled models, loaded here
        patch.delenv("FACELOCK_ASSETS", raising=False)
        patch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        device = torch.device("cpu")
        autoencoder = as_autoencoder(loading.load_autoencoder("madebyollin/taesd", "", device, torch.float32))
        face = loading.load_face_identity("sface", device)
    clean = np.asarray(load_image(source), dtype=int)
    scores = {}
    with torch.no_grad():
        reference = face.reference(pil_to_tensor(load_image(source)))
        for label, path in (("protected", tmp_path / "astronaut_protected.png"), ("noise", tmp_path / "noise.png")):
            assert np.abs(np.asarray(load_image(path), dtype=int) - clean).max() <= 4  # the preset's budget, 4/255
            scores[label] = face(autoencoder(pil_to_tensor(load_image(path))).clamp(-1, 1), reference).item()
    assert scores["protected"] < scores["noise"] - 0.3, scores


def test_a_truncated_autoencoder_is_one_line_error(tiny_vae_dir, tmp_path):
    damaged = tmp_path / "vae"
    damaged.mkdir()
    for item in tiny_vae_dir.iterdir():
        data = item.read_bytes()
        (damaged / item.name).write_bytes(data[: len(data) // 3] if item.suffix == ".safetensors" else data)
    with pytest.raises(ModelUnavailable, match="cannot load the autoencoder of .* may be damaged") as raised:
        loading.load_autoencoder(str(damaged), "", torch.device("cpu"), torch.float32)
    assert "\n" not in str(raised.value)
