"""Pinned, verified downloads: every model this toolkit fetches comes from a fixed revision or a checked file.

Hub repositories are loaded at the commit this project was tested with (`hub_revision`); a hub id not listed here
is loaded at the revision the user names (`org/name@revision`) or, failing that, the current one, with a warning.
Files fetched by URL have a SHA-256: a download that does not match is deleted and reported, and a cached copy is
checked before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

#: Hugging Face repositories at the commits this project was tested with.
HUB_REVISIONS = {
    "timbrooks/instruct-pix2pix": "31519b5cb02a7fd89b906d88731cd4d6a7bbf88d",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    "runwayml/stable-diffusion-v1-5": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    "openai/clip-vit-base-patch32": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
    "madebyollin/taesd": "614f76814bbe30edbe2e627ace1c2234c81a2c0e",
    "minchul/cvlface_adaface_vit_base_kprpe_webface4m": "6530d73fb0af4d1d8287f31d559780c648ebd22a",
}


@dataclass(frozen=True)
class PinnedFile:
    """A file fetched by URL, with the SHA-256 of its bytes (or its first digits, where only those are published,
    as torchvision does in its file names)."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


#: SFace of the OpenCV model zoo, at a fixed commit (the repository stores it with Git LFS).
SFACE = PinnedFile("https://github.com/opencv/opencv_zoo/raw/aeee99703db82d838f6c66b90429b0468bcedeb3/models/"
                   "face_recognition_sface/face_recognition_sface_2021dec.onnx",
                   "f6abbfff9575e3041db692c1e29d782e995191888477fd59ebc81202d99fc63b")
#: facenet-pytorch's InceptionResnetV1 VGGFace2 weights (facenet-pytorch itself downloads them unchecked).
FACENET_VGGFACE2 = PinnedFile("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
                              "20180402-114759-vggface2.pt",
                              "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b")
#: torchvision's VGG16, the backbone of LPIPS-VGG (torchvision checks only an 8-digit prefix of the hash).
VGG16 = PinnedFile("https://download.pytorch.org/models/vgg16-397923af.pth",
                   "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0")


#: torchvision's VGG19, for Flux-Guard's feature loss (torchvision publishes the first 8 digits of its SHA-256).
VGG19 = PinnedFile("https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", "dcbb9e9d")


class ChecksumMismatch(OSError):
    """A downloaded or cached file is not the pinned one."""


def split_revision(name: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (`org/name`, revision); otherwise (name, the pinned revision or None)."""
    if "@" in name and not os.path.exists(name):
        repo, revision = name.rsplit("@", 1)
        return repo, revision
    return name, HUB_REVISIONS.get(name)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, destination: str) -> None:
    import torch

    torch.hub.download_url_to_file(url, destination, progress=True)


def fetch(pinned: PinnedFile, path: str | Path, download: Callable[[str, str], None] | None = None) -> Path:
    """`pinned` at `path`: a cached copy is checked, otherwise it is downloaded (by `download(url, destination)`,
    default torch's downloader) beside `path` and moved into place only if its SHA-256 matches. A mismatch raises
    `ChecksumMismatch` and keeps nothing."""
    path = Path(path)
    download = download or _download
    if path.is_file():
        if sha256_of(path).startswith(pinned.sha256):
            return path
        logger.warning("%s does not match its pinned SHA-256; downloading it again", path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        logger.info("downloading %s to %s", pinned.url, path)
        download(pinned.url, tmp)
        actual = sha256_of(tmp)
        if not actual.startswith(pinned.sha256):
            raise ChecksumMismatch(f"{pinned.url} has SHA-256 {actual}, not the pinned {pinned.sha256}; the file "
                                   f"was not kept")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
