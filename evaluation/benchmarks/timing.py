"""How the benchmarks measure time and memory: the machine's description, wall-clock medians after a warm-up,
peak memory (the CUDA allocator's, or a CPU process's resident memory) and a fresh process per figure."""

from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch


def machine(devices: Sequence[torch.device]) -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, {platform.system()}")
    return text + "".join(f"; {torch.cuda.get_device_name(d)}" for d in devices if d.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakMemory:
    """The peak memory of this process from now on: the CUDA allocator's peak, or on a CPU the resident memory,
    sampled every 5 ms (the kernel's own maximum would include the parent's, as it survives exec)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = psutil.Process().memory_info().rss
        self.running = device.type != "cuda"
        if self.running:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while self.running:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.005)

    def megabytes(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self.running = False
        self.thread.join()
        return self.peak / 2**20


def in_fresh_process(fn: Callable, *args):
    """Run `fn(*args)` in a new process, so that the peak memory it reports is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
