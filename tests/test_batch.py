"""Batch jobs: the device and process group of each process, stale temporaries, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, write_photo
from methods.pipeline.runs import BackgroundWriter, BatchRun, check_writable, process_device
from utils import UserError, load_image


@pytest.mark.parametrize("requested, local, gpus, expected", [
    ("cpu", 1, 1, "cpu"),  # the CPU of a GPU machine
    ("auto", 0, 0, "cpu"),
    ("auto", 1, 2, "cuda:1"),  # one GPU per process where there are enough
    ("cuda", 3, 2, "cuda:1"),  # fewer GPUs than processes: shared, never an ordinal that does not exist
    ("auto", 1, 1, "cuda:0"),
    ("cuda:1", 0, 2, "cuda:1"),  # an explicit GPU as given
])
def test_each_process_gets_a_device_that_exists(requested, local, gpus, expected):
    assert process_device(requested, local, gpus) == torch.device(expected)


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        process_device("cuda", 0, 0)


def test_a_new_run_removes_temporaries_left_by_a_killed_one_and_nothing_else(tmp_path):
    folder = tmp_path / "out"
    (folder / "prompt0").mkdir(parents=True)
    stale = [folder / ".facelock-a.png.k2j3.tmp", folder / "prompt0" / ".facelock-b.png.x9.tmp"]
    users = [folder / ".notes.tmp", folder / "prompt0" / ".draft.png.x9.tmp"]  # not the toolkit's
    for path in [*stale, *users]:
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - 60, time.time() - 60))
    kept = folder / "a.png"
    kept.write_bytes(b"done")
    BatchRun(folder, {"p": 1}, ["p"], overwrite=False, device="cpu")
    assert not any(path.exists() for path in stale) and kept.exists() and all(path.exists() for path in users)


def test_a_finished_output_is_in_the_manifest_on_disk_as_soon_as_it_is_written(tmp_path):
    """A run killed at any point after an output landed keeps it: the writer records and saves at once."""
    folder = tmp_path / "out"
    folder.mkdir()
    run = BatchRun(folder, {"p": 1}, ["p"], overwrite=False, device="cpu")
    with BackgroundWriter() as writer:
        writer.submit(lambda: (folder / "a.png").write_bytes(b"png"), lambda: run.record("a.png", {"source": "a"}))
        writer._queue[0].result()  # the write and its record are done; nothing else has run on this thread
        on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["outputs"] == {"a.png": {"source": "a"}}


@pytest.mark.parametrize("contents", ['{"outputs": ', '[1, 2]', '{"outputs": {"a.png": 3}}', '{"failed": []}'])
def test_a_damaged_manifest_is_one_clear_error_and_overwrite_starts_afresh(tmp_path, contents):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(contents)
    with pytest.raises(UserError, match="manifest.json is not a manifest .*--overwrite"):
        BatchRun(folder, {"p": 1}, ["p"], overwrite=False, device="cpu")
    assert BatchRun(folder, {"p": 1}, ["p"], overwrite=True, device="cpu").manifest["outputs"] == {}


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    for folder in (blocked, blocked / "budget_0.03"):
        with pytest.raises(UserError, match=f"cannot write to {folder} "):
            check_writable(folder)
    check_writable(tmp_path / "new" / "budget_0.03")  # made where it does not exist yet
    assert (tmp_path / "new" / "budget_0.03").is_dir() and not list((tmp_path / "new" / "budget_0.03").iterdir())
#: A machine with one GPU, as the processes see it: torch reports one CUDA device, and a barrier that names a GPU
#: beyond it fails as CUDA does ("invalid device ordinal").
FAKE_GPU = """
import torch
import torch.distributed

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
_barrier = torch.distributed.barrier


def barrier(*args, device_ids=None, **kwargs):
    if device_ids and max(device_ids) >= torch.cuda.device_count():
        raise RuntimeError("CUDA error: invalid device ordinal")
    return _barrier(*args, **kwargs)


torch.distributed.barrier = barrier
"""


def test_two_cpu_processes_on_a_machine_with_one_gpu_finish_together(tmp_path, tiny_vae_dir):
    """The CPU of a GPU machine: torch reports one GPU (faked in both processes), the user asks for the CPU; the
    processes must not ask CUDA for a device per process (the barrier crashed there with an invalid ordinal)."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "sitecustomize.py").write_text(FAKE_GPU)
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        write_photo(photos / f"p{k}.png", size=(64, 64), seed=k)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "fake"),
                                                                      os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main_defend.py"), "--image_dir", str(photos), "--output_dir", str(tmp_path / "out"),
         "--defend_method", "encoder", "--vae", str(tiny_vae_dir), "--num_iters", "2", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "budget_0.03" / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"p0.png", "p1.png", "p2.png"}


def kill_when(command: list[str], ready, timeout: float = 240) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds (or when it ends by itself)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def test_main_defend_killed_mid_batch_finishes_on_rerun_with_every_output_valid(tmp_path, tiny_vae_dir):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for k in range(5):
        write_photo(photos / f"p{k}.png", size=(96, 96), seed=k)
    command = [sys.executable, str(ROOT / "main_defend.py"), "--image_dir", str(photos), "--output_dir", str(out),
               "--defend_method", "encoder", "--vae", str(tiny_vae_dir), "--num_iters", "30", "--device", "cpu"]
    folder = out / "budget_0.03"
    for wanted in (1, 3):  # killed twice, after the first and the third photo, at no chosen point of the work
        kill_when(command, lambda: len(list(folder.glob("p*.png"))) >= wanted)
    assert 0 < len(list(folder.glob("p*.png"))) < 5
    assert subprocess.run(command, capture_output=True, cwd=ROOT, timeout=300).returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [f"p{k}.png" for k in range(5)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["outputs"]) == [f"p{k}.png" for k in range(5)] and not manifest["failed"]
    for k in range(5):
        protected = np.asarray(Image.open(folder / f"p{k}.png")).astype(int)  # decodes: not half-written
        clean = np.asarray(load_image(photos / f"p{k}.png")).astype(int)
        assert protected.shape == clean.shape and 0 < np.abs(protected - clean).max() <= 3


def test_main_edit_killed_mid_batch_finishes_on_rerun_with_every_edit_valid(tmp_path, tiny_pix2pix_dir):
    sources, edits = tmp_path / "src", tmp_path / "edits"
    sources.mkdir()
    for k in range(3):
        write_photo(sources / f"p{k}.png", size=(64, 64), seed=k)
    command = [sys.executable, str(ROOT / "main_edit.py"), "--src_dir", str(sources), "--edit_dir", str(edits),
               "--model_id", str(tiny_pix2pix_dir), "--seed", "0", "--prompt_indices", "0,1",
               "--num_inference_steps", "20", "--device", "cpu"]
    folder = edits / "seed0"
    kill_when(command, lambda: len(list(folder.rglob("p*.png"))) >= 2)
    assert 0 < len(list(folder.rglob("p*.png"))) < 6
    assert subprocess.run(command, capture_output=True, cwd=ROOT, timeout=300).returncode == 0
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == ["manifest.json"] + [f"prompt{i}/p{k}.png" for i in (0, 1) for k in range(3)]
    for path in folder.rglob("p*.png"):
        assert Image.open(path).convert("RGB").size == (64, 64)


def test_prefetching_keeps_order_and_hands_errors_over():
    from methods.pipeline.runs import prefetched

    assert list(prefetched(iter(range(7)), depth=2)) == list(range(7))

    def failing():
        yield 1
        raise ValueError("unreadable")

    seen = []
    with pytest.raises(ValueError, match="unreadable"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [1]
    produced = []

    def endless():
        for k in range(1000):
            produced.append(k)
            yield k

    for item in prefetched(endless(), depth=1):
        if item == 2:
            break
    time.sleep(0.3)
    assert len(produced) < 10  # the producer stops when the consumer does
