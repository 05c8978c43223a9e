"""Progress bars: rare redraws off a terminal, and listeners that follow the work (the web page's progress)."""

from __future__ import annotations

import io
import threading
import time

import methods
from conftest import random_images, tiny_autoencoder_tiny
from methods.progress import NON_TTY_INTERVAL, observe, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(output: str) -> int:
    return output.count("\r")


def run_bar(file, steps: int = 60, pause: float = 0.01) -> str:
    bar = progress_bar(range(steps), desc="work", file=file)
    for i in bar:
        time.sleep(pause)
        bar.set_postfix(loss=f"{i}", refresh=False)
    bar.close()
    return file.getvalue()


def test_a_bar_off_a_terminal_writes_rarely_and_on_a_terminal_often():
    assert NON_TTY_INTERVAL >= 2
    off = run_bar(io.StringIO())
    on = run_bar(Terminal())
    assert redraws(off) <= 3  # the first draw, perhaps one more, the last
    assert redraws(on) >= 4  # about every 0.1 s over 0.6 s
    assert "60/60" in off and "60/60" in on


def test_an_attack_logging_to_a_pipe_does_not_write_a_segment_per_iteration(capsys):
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
