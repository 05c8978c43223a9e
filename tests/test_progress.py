"""Progress bars: rare redraws off a terminal, and listeners that follow the work (the web page's progress)."""

from __future__ import annotations

import io
import threading

import pytest

import methods
from conftest import random_images, tiny_autoencoder_tiny
from methods.progress import NON_TTY_INTERVAL, observe, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(output: str) -> int:
    return output.count("\r")


class Clock:
    """The time the bars read, which moves only when the test says: by `advance`, or by `tick` at every reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    import tqdm.std

    fake = Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # what every new bar reads the time with
    return fake


def run_bar(file, clock: Clock, steps: int = 60, pause: float = 0.01) -> str:
    bar = progress_bar(range(steps), desc="work", file=file)
    for i in bar:
        clock.advance(pause)
        bar.set_postfix(loss=f"{i}", refresh=False)
    bar.close()
    return file.getvalue()


def test_a_bar_off_a_terminal_writes_rarely_and_on_a_terminal_often(clock):
    assert NON_TTY_INTERVAL >= 2
    off = run_bar(io.StringIO(), clock)
    on = run_bar(Terminal(), clock)
    assert redraws(off) <= 2  # 0.6 s of work: the first draw and the last
    assert redraws(on) >= 5  # about every 0.1 s over 0.6 s
    assert "60/60" in off and "60/60" in on
    assert redraws(run_bar(io.StringIO(), clock, steps=30, pause=1.0)) >= 6  # 30 s of work: every 5 s, and the last


def test_an_attack_logging_to_a_pipe_does_not_write_a_segment_per_iteration(capsys, clock):
    clock.tick = 0.1  # every reading of the clock takes a tenth of a second, however slow the machine is
    attack = methods.create("vae", autoencoder=tiny_autoencoder_tiny(), eps=0.03, step_size=0.01, num_iters=20,
                            progress=True)
    attack(random_images(1, 32))
    assert redraws(capsys.readouterr().err) <= 4


def test_listeners_see_every_bar_made_in_their_block_and_thread():
    seen, elsewhere = [], []

    def other_thread():
        for _ in progress_bar(range(3), desc="other", disable=True):
            pass

    with observe(lambda desc, done, total: seen.append((desc, done, total))):
        for _ in progress_bar(range(3), desc="steps", disable=True):
            pass
        manual = progress_bar(total=2, desc="images", disable=True)
        manual.update(2)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    for _ in progress_bar(range(2), desc="after", disable=True):
        elsewhere.append(1)
    assert [s for s in seen if s[0] == "steps"] == [("steps", k, 3) for k in range(4)]
    assert ("images", 2, 2) in seen
    assert not [s for s in seen if s[0] in ("other", "after")]
