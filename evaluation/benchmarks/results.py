"""Where a benchmark's measured tables go: a markdown file (by convention `evaluation/results/<benchmark>.md`) that
says on which machine, on what date and with which exact command its figures were made, so that a figure quoted in
a README is a link to a file that one command regenerates."""

from __future__ import annotations

import datetime
import shlex
from pathlib import Path
from typing import Sequence

import torch

from utils import atomic_write

from .timing import machine

#: The folder of the measured tables the READMEs link to.
RESULTS = Path(__file__).resolve().parents[1] / "results"


def command(module: str, argv: Sequence[str]) -> str:
    """The command line that reruns a benchmark: `python -m <module> <argv>`."""
    return " ".join(["python -m", module, *map(shlex.quote, argv)])


def write_results(path: str | Path, title: str, body: str, module: str, argv: Sequence[str],
                  devices: Sequence[torch.device] = (torch.device("cpu"),)) -> None:
    """Write `body` (markdown tables) under a heading with the machine, today's date and the command."""
    header = (f"# {title}\n\nMeasured on {machine(devices)}, {datetime.date.today().isoformat()}, with:\n\n"
              f"```bash\n{command(module, argv)}\n```\n\n")
    atomic_write(path, lambda tmp: tmp.write_text(header + body.rstrip() + "\n"))
