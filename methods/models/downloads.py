"""Verified files, and whether the network can give them: every file this toolkit fetches is checked against its
SHA-256, and a host that cannot be reached is found out in seconds, not after minutes of retries.

A file fetched by URL (`PinnedFile`) has a SHA-256: a download that does not match is deleted and reported, and a
cached copy is checked before it is used. `unreachable` asks a host once, with a short timeout, through the proxies
the environment names; its answer is kept for the rest of the process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: Seconds the network gets to answer before a host counts as unreachable.
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class PinnedFile:
    """A file fetched by URL, with the SHA-256 of its bytes (or its first digits, where only those are published,
    as torchvision does in its file names)."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


class ChecksumMismatch(OSError):
    """A downloaded or cached file is not the pinned one."""


class Unreachable(OSError):
    """The network cannot give what is asked for (no connection, a host that does not answer, offline mode)."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the host of `url` cannot be reached from this machine, in a few words; None where it answers (any HTTP
    answer counts, an error page too). One request with `timeout` seconds, through the environment's proxies."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}/"
    try:
        urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"{parts.netloc} did not answer: {reason}"
    return None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or its host does not answer); None where it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return unreachable(constants.ENDPOINT)


def _download(url: str, destination: str) -> None:
    import torch

    reason = unreachable(url)
    if reason:
        raise Unreachable(f"the network is unreachable ({reason})")
    logger.info("downloading %s", url)
    torch.hub.download_url_to_file(url, destination, progress=True)


def fetch(pinned: PinnedFile, path: str | Path, download: Callable[[str, str], None] | None = None) -> Path:
    """`pinned` at `path`: a cached copy is checked, otherwise it is downloaded (by `download(url, destination)`,
    default torch's downloader) beside `path` and moved into place only if its SHA-256 matches. A mismatch raises
    `ChecksumMismatch` and keeps nothing; a network that cannot be reached raises `Unreachable` at once."""
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
