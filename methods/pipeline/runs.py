"""The bookkeeping of batch jobs over folders: resumable manifests, background writing and loading, and the split
between processes started by `torchrun` or `accelerate launch`.

The processes exchange nothing but one barrier at the end of a job, so their process group always uses gloo, with no
device ids: that works for CPU processes, for processes sharing a GPU and for one GPU per process alike. Each
process picks its device from the one the user asked for: `cpu` stays on the CPU; `auto` or `cuda` gives local
process `k` the GPU `k mod (GPUs on this machine)`, so a machine with fewer GPUs than processes shares them instead of
asking for a GPU that does not exist; an explicit `cuda:i` is taken as it is.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from utils import TEMPORARY_PREFIX, TEMPORARY_SUFFIX, UserError, pick_device, write_json

logger = logging.getLogger(__name__)

#: Packages whose versions every manifest records.
VERSIONED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "facenet-pytorch", "lpips", "onnx2torch",
                      "accelerate", "numpy", "pillow", "scikit-image")
#: How long the end-of-job barrier waits for the slowest process (a long batch split unevenly can take hours).
BARRIER_TIMEOUT = datetime.timedelta(days=2)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def process_device(requested: str, local_index: int, cuda_count: int) -> torch.device:
    """The device of local process `local_index` for `--device requested`, on a machine with `cuda_count` GPUs."""
    if requested == "auto":
        requested = "cuda" if cuda_count else "cpu"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not cuda_count:
        raise UserError(f"--device {requested}: CUDA is not available on this machine")
    if device.index is not None:
        return device
    return torch.device("cuda", local_index % cuda_count)


class Processes:
    """This process's place among the processes of a job (from the `RANK`, `WORLD_SIZE` and `LOCAL_RANK` variables
    that `torchrun` and `accelerate launch` set; one process otherwise) and its device."""

    def __init__(self, requested_device: str = "auto") -> None:
        self.num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        self.process_index = int(os.environ.get("RANK", "0"))
        self.local_index = int(os.environ.get("LOCAL_RANK", "0"))
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.num_processes == 1:
            self.device = pick_device(requested_device)
            return
        self.device = process_device(requested_device, self.local_index, cuda_count)
        if cuda_count and self.device.type == "cuda" and self.num_processes > cuda_count:
            logger.warning("%d processes share %d GPU(s)", self.num_processes, cuda_count)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", init_method="env://", timeout=BARRIER_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()


class BatchRun:
    """The bookkeeping of a batch job, which `accelerate launch` or `torchrun` may split between processes.

    Each process records its outputs and failures in its own manifest part as it goes, so an interrupted run
    keeps what it did; the main process merges the parts into `manifest.json` at the end. A folder holding results
    made with different `defining` parameters is refused, unless `overwrite`. Temporary files left by a process
    that was killed while writing are removed when the next run starts.
    """

    def __init__(self, folder: Path, parameters: dict, defining: Sequence[str], overwrite: bool,
                 device: str = "auto") -> None:
        started = time.time()
        self.processes = Processes(device)
        self.folder = folder
        self.lock = threading.Lock()  # the writer thread records outputs while the main thread records failures
        earlier = {} if overwrite else self._read()
        # a parameter missing from an earlier manifest was added later, with a default that keeps the old behaviour
        changed = [k for k in defining
                   if earlier.get("parameters") and earlier["parameters"].get(k, parameters[k]) != parameters[k]]
        if changed and not overwrite:
            before = ", ".join(f"--{k} {earlier['parameters'].get(k)}" for k in changed)
            raise UserError(f"{folder} holds results made with {before}; use another output folder or --overwrite")
        self.manifest = {"parameters": parameters, "versions": package_versions(),
                         "outputs": {} if overwrite else earlier.get("outputs", {}), "failed": {}}
        multi = self.processes.num_processes > 1
        self.part = folder / (f"manifest.part{self.processes.process_index}.json" if multi else "manifest.json")
        if self.is_main:
            self._remove_stale_temporaries(started)

    @property
    def device(self) -> torch.device:
        return self.processes.device

    @property
    def num_processes(self) -> int:
        return self.processes.num_processes

    @property
    def is_main(self) -> bool:
        return self.processes.is_main

    def mine(self, work: list) -> list:
        """This process's share of `work`."""
        return work[self.processes.process_index::self.processes.num_processes]

    def recorded(self, key: str, sha256: str | None = None) -> bool:
        """Whether output `key` is finished: recorded in the manifest and, where `sha256` is given, made from an input
        with that SHA-256 (an input replaced under the same name is done again)."""
        entry = self.manifest["outputs"].get(key)
        return entry is not None and (sha256 is None or entry.get("sha256") == sha256)

    def record(self, key: str, entry: dict) -> None:
        """Record a finished output and save the manifest at once, so that a killed run keeps it."""
        with self.lock:
            self.manifest["outputs"][key] = entry
            write_json(self.manifest, self.part)

    def fail(self, key: str, reason: str) -> None:
        with self.lock:
            self.manifest["failed"][key] = reason

    def save(self) -> None:
        with self.lock:
            write_json(self.manifest, self.part)

    def finish(self) -> dict | None:
        """Wait for every process; on the main process merge the parts and return the whole manifest."""
        self.save()
        self.processes.wait_for_everyone()
        if not self.is_main:
            return None
        for part in sorted(self.folder.glob("manifest.part*.json")):
            other = read_manifest(part)
            self.manifest["outputs"].update(other.get("outputs", {}))
            self.manifest["failed"].update(other.get("failed", {}))
        write_json(self.manifest, self.folder / "manifest.json")
        for part in self.folder.glob("manifest.part*.json"):
            part.unlink()
        return self.manifest

    def report(self, counts: str, folder: Path, say: Callable[[str], None] = logger.info) -> int:
        """Tell `say` the run's counts and every failure; the exit status is 1 if anything failed."""
        failed = self.manifest["failed"]
        say(f"{counts}, failed {len(failed)}; outputs and manifest.json in {folder}")
        for key, reason in sorted(failed.items()):
            say(f"  failed: {key}: {reason}")
        return 1 if failed else 0

    def _read(self) -> dict:
        merged: dict = {}
        for path in [self.folder / "manifest.json", *sorted(self.folder.glob("manifest.part*.json"))]:
            if path.is_file():
                data = read_manifest(path)
                merged.setdefault("parameters", data.get("parameters"))
                merged.setdefault("outputs", {}).update(data.get("outputs", {}))
        return merged

    def _remove_stale_temporaries(self, before: float) -> None:
        """Delete the temporary files of `utils.atomic_write` (`.facelock-<name>.<random>.tmp`) older than this run;
        nothing else (a user's own `.tmp` files stay)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.rglob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
            if path.is_file() and path.stat().st_mtime < before:
                logger.info("removing %s, left by an interrupted run", path)
                path.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict:
    """A manifest (or a process's part of one) as this toolkit writes it; `UserError` for one that cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not a manifest this toolkit can read ({error}); move it away or pass "
                        f"--overwrite") from None
    fields = {"parameters": (dict, type(None)), "outputs": dict, "failed": dict}
    wrong = not isinstance(data, dict) or any(not isinstance(data.get(k, {}), kinds) for k, kinds in fields.items())
    if wrong or not all(isinstance(entry, dict) for entry in data.get("outputs", {}).values()):
        raise UserError(f"{path} is not a manifest this toolkit wrote (unexpected contents); move it away or pass "
                        f"--overwrite")
    return data


def check_writable(folder: Path) -> None:
    """Make sure files can be written in `folder` (made if it does not exist) before any work is spent on them;
    `UserError` in one line where they cannot (a read-only folder, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror or error}); choose another output") from None


class BackgroundWriter:
    """Writes outputs on a background thread while the next batch is computed. Each write has a `done` callback
    (recording the output in the manifest, which saves it), which runs on the writer thread, in order, as soon as the
    file is in place; at most `pending` writes wait at a time, so memory stays bounded."""

    def __init__(self, pending: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pending = pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._queue: list = []

    def submit(self, write: Callable[[], None], done: Callable[[], None]) -> None:
        while len(self._queue) >= self.pending:
            self._finish_oldest()
        self._queue.append(self._executor.submit(lambda: (write(), done())))

    def collect(self) -> None:
        """Forget the writes that have finished (and raise the error of a write that failed)."""
        while self._queue and self._queue[0].done():
            self._finish_oldest()

    def close(self) -> None:
        """Wait for every write and its callback."""
        while self._queue:
            self._finish_oldest()
        self._executor.shutdown()

    def _finish_oldest(self) -> None:
        self._queue.pop(0).result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # let the writes in flight land (each records itself once in place)
            self._executor.shutdown(wait=True)


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """The items of `items`, produced on a background thread up to `depth` ahead of the consumer (so loading and
    face detection of the next batch overlap the attack on the current one). An exception is raised to the
    consumer where it happened."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as error:  # handed to the consumer
            buffer.put((done, error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
