"""Pinned revisions and checked downloads (no network: the downloader is replaced)."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

import methods.models.downloads as downloads
import methods.models.loading as loading
from methods.models.downloads import ChecksumMismatch, PinnedFile, fetch
from methods.models.loading import HUB_REVISIONS, load_face_identity, load_pretrained, split_revision
from utils import ModelUnavailable

GOOD = b"the pinned model bytes"
PINNED = PinnedFile("https://example.org/models/model.bin", hashlib.sha256(GOOD).hexdigest())


def writer(data: bytes, calls: list):
    def download(url: str, destination: str) -> None:
        calls.append(url)
        with open(destination, "wb") as f:
            f.write(data)
    return download


def test_a_matching_download_is_kept_and_then_read_from_the_cache(tmp_path):
    calls = []
    path = fetch(PINNED, tmp_path / "m" / "model.bin", writer(GOOD, calls))
    assert path.read_bytes() == GOOD and calls == [PINNED.url]
    assert fetch(PINNED, path, writer(GOOD, calls)) == path and calls == [PINNED.url]  # checked, not fetched again


def test_a_corrupted_download_is_an_error_and_nothing_is_kept(tmp_path):
    with pytest.raises(ChecksumMismatch, match="not the pinned .* not kept"):
        fetch(PINNED, tmp_path / "model.bin", writer(b"truncated", []))
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_a_corrupted_cached_copy_is_replaced(tmp_path, caplog):
    path = tmp_path / "model.bin"
    path.write_bytes(b"bit rot")
    calls = []
    with caplog.at_level(logging.WARNING):
        fetch(PINNED, path, writer(GOOD, calls))
    assert path.read_bytes() == GOOD and calls == [PINNED.url] and "does not match" in caplog.text


def test_sface_from_the_zoo_is_pinned_to_a_commit_and_checked(tmp_path, monkeypatch):
    assert "/raw/main/" not in loading.SFACE.url and len(loading.SFACE.sha256) == 64
    monkeypatch.delenv("FACELOCK_ASSETS", raising=False)
    monkeypatch.setattr(loading, "BUNDLED", tmp_path / "no bundle")  # only the download can give it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(downloads, "_download", writer(b"<html>rate limited</html>", []))
    with pytest.raises(ModelUnavailable, match="SHA-256"):
        load_face_identity("sface", torch.device("cpu"))
    assert not list((tmp_path / "hub" / "facelock" / "sface").glob("*.onnx"))


def test_hub_models_load_at_their_pinned_revision_or_the_one_named(caplog):
    seen = []

    def load(source, **kwargs):
        seen.append((source, kwargs.get("revision")))
        return "model"

    assert load_pretrained(load, "timbrooks/instruct-pix2pix", "the editor") == "model"
    assert seen[-1] == ("timbrooks/instruct-pix2pix", HUB_REVISIONS["timbrooks/instruct-pix2pix"])
    load_pretrained(load, "someone/editor@0123abc", "the editor")
    assert seen[-1] == ("someone/editor", "0123abc")
    with caplog.at_level(logging.WARNING):
        load_pretrained(load, "someone/editor", "the editor")
    assert seen[-1] == ("someone/editor", None) and "not pinned" in caplog.text
    assert split_revision("madebyollin/taesd") == ("madebyollin/taesd", HUB_REVISIONS["madebyollin/taesd"])
    assert all(len(revision) == 40 for revision in HUB_REVISIONS.values())


def test_a_file_published_with_a_hash_prefix_is_checked_against_it(tmp_path):
    prefixed = PinnedFile(PINNED.url, PINNED.sha256[:8])  # as torchvision names its files
    assert fetch(prefixed, tmp_path / "a.bin", writer(GOOD, [])).read_bytes() == GOOD
    with pytest.raises(ChecksumMismatch):
        fetch(prefixed, tmp_path / "b.bin", writer(b"other bytes", []))
    assert loading.VGG19.sha256 == "dcbb9e9d" and loading.VGG19.filename == "vgg19-dcbb9e9d.pth"
